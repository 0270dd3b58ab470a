"""Wording shared by every layer's messages: counted nouns and the name a user most likely meant.
Here, below everything, so that an error raised by a method and a line printed by the command line
say it the same way."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def plural(count: int, noun: str) -> str:
    """'1 shard', '3 shards', '0 shards': the count with its noun (regular plurals only)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def did_you_mean(name: object, names: Iterable[str]) -> str:
    """' (did you mean 'tome'?)' when one of `names` is close to the unknown `name` (case aside:
    'ToMe' finds 'tome'), else ''; appended to an "unknown name" message."""
    if not isinstance(name, str):
        return ""
    by_case = {n.casefold(): n for n in names}
    close = difflib.get_close_matches(name.casefold(), by_case, n=1)
    return f" (did you mean {by_case[close[0]]!r}?)" if close else ""
