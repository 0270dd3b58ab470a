"""README's Python snippets run as written, offline, on the packaged models: each ```python block is
executed on its own, in a fresh namespace (every block imports and loads what it uses)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenfuse.methods import registry

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.floor]


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes land in a temporary folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind, names in registry._METHODS.items():  # a snippet's @register stays in this test
        monkeypatch.setitem(registry._METHODS, kind, dict(names))
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
