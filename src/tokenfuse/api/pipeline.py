"""A model's own embedding pipeline after its encoder, as `tokenfuse.embed` reproduces it: the pooling
mode and whether the pooled vector is L2-normalised, read from its sentence-transformers
configuration (`modules.json`, the Pooling module's `config.json`) in the model's folder or, for a
hub id, in the Hugging Face cache (the hub itself when online).

embed reproduces a Pooling module (`api.text.pool`, size-aware on reduced tokens) followed by
nothing or by `Normalize` (sentence-transformers' L2 normalisation). A module after the Pooling that
it cannot reproduce (Dense, LayerNorm, ...) is refused, not skipped: skipping it would return
vectors of another space than the model's. Such a model runs reduced as a SentenceTransformer
(`tokenfuse.apply(SentenceTransformer(...), ...)`), whose `encode` runs every module.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torch import nn

POOLINGS = ("auto", "mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers' Pooling configuration: each flag, the mode it turns on, and its default
SENTENCE_TRANSFORMERS = {
    "pooling_mode_cls_token": ("cls", False),
    "pooling_mode_mean_tokens": ("mean", True),
    "pooling_mode_max_tokens": ("max", False),
    "pooling_mode_mean_sqrt_len_tokens": ("mean_sqrt_len_tokens", False),
    "pooling_mode_weightedmean_tokens": ("weightedmean", False),
    "pooling_mode_lasttoken": ("lasttoken", False),
}
AFTER_POOLING = ("Normalize",)  # the modules after the Pooling that embed reproduces


@dataclass(frozen=True)
class Pipeline:
    """What embed does after the encoder: pool by `pooling` (one of POOLINGS but auto), then
    L2-normalise if `normalize`."""

    pooling: str = "mean"
    normalize: bool = False


@dataclass(frozen=True)
class Configured:
    """A model's pipeline as its configuration lists it, before any check: the pooling modes its
    Pooling config turns on (None: modules.json lists no Pooling module), the file they come from,
    and the (type, folder) of each module after the Pooling."""

    name: str
    modes: tuple[str, ...] | None = ("mean",)
    source: str = "1_Pooling/config.json"
    after: tuple[tuple[str, str], ...] = ()

    def check(self) -> None:
        """Refuse a configuration whose output is not a pooling that embed can follow."""
        if self.modes is None:
            raise ValueError(
                f"{self.name}: modules.json lists no Pooling module, so its embedding is not a pooling "
                "of the encoder's tokens; pass pooling= and normalize= to choose"
            )
        other = [f"{kind} ({path})" for kind, path in self.after if kind not in AFTER_POOLING]
        if other:
            raise ValueError(
                f"{self.name}: modules.json runs {', '.join(other)} after its Pooling, which "
                f"tokenfuse.embed does not reproduce (it follows Pooling and {', '.join(AFTER_POOLING)}), "
                "so its vectors would not be the model's own; reduce it as a SentenceTransformer, whose "
                "encode runs every module (tokenfuse.apply(SentenceTransformer(path), ...)), or pass "
                "pooling= and normalize= to embed the encoder's pooled tokens alone"
            )

    def pooling(self) -> str:
        """The one mode embed reproduces; refused otherwise."""
        supported = POOLINGS[1:]
        modes = self.modes or ()
        if len(modes) != 1 or modes[0] not in supported:
            raise ValueError(
                f"{self.name}: its pooling configuration ({self.source}) asks for "
                f"{' + '.join(modes) or 'no'} pooling; tokenfuse reproduces one of {', '.join(supported)}; "
                "pass pooling= to choose one, knowing it differs from the model's own"
            )
        return modes[0]

    @property
    def normalize(self) -> bool:
        return any(kind == "Normalize" for kind, _ in self.after)


def pipeline_of(model: nn.Module, pooling: str = "auto", normalize: bool | None = None) -> Pipeline:
    """The model's own pipeline after its encoder, with `pooling` (unless "auto") and `normalize`
    (unless None) forced. What is not forced is read from the model's sentence-transformers
    configuration, in its folder or, for a hub id, in the Hugging Face cache. A model with no such
    configuration (a plain transformers model, or one built from a config) is pooled by mean and not
    normalised; one whose configuration cannot be read (offline, not cached) too, with a warning; a
    pipeline embed cannot reproduce (`Configured.check`, `Configured.pooling`) is refused."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if normalize is not None and not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True, False or None (the model's own), got {normalize!r}")
    if pooling != "auto" and normalize is not None:
        return Pipeline(pooling, normalize)
    configured = _configured(model)
    configured.check()
    return Pipeline(
        configured.pooling() if pooling == "auto" else pooling,
        configured.normalize if normalize is None else normalize,
    )


def pooling_of(model: nn.Module) -> str:
    """The model's own pooling mode (`pipeline_of`), for the passes that pool without normalising."""
    return pipeline_of(model, normalize=False).pooling


def _configured(model: nn.Module) -> Configured:
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return Configured(name)
    folder = Path(name)
    if folder.is_dir():
        return _read(name, lambda f: folder / f if (folder / f).is_file() else None)
    configured, problem = _hub_configured(name, getattr(model.config, "_commit_hash", None))
    if problem:
        warnings.warn(
            f"{name}: could not read its pooling configuration ({problem}); pooling by mean, not "
            "normalised. Pass pooling= and normalize= to embed to choose, or run once online to cache it",
            stacklevel=4,
        )
    return configured


@functools.cache
def _hub_configured(repo: str, revision: str | None) -> tuple[Configured, str | None]:
    """(configuration, why it is unknown) for a hub model; cached, since a lookup may go to the network."""
    try:
        return _read(repo, functools.partial(_hub_file, repo, revision=revision)), None
    except LookupError as e:
        return Configured(repo), str(e)


def _hub_file(repo: str, filename: str, revision: str | None) -> Path | None:
    """A file of a hub model from the cache (or the hub, online); None where the model has none.
    LookupError where that cannot be told: offline and not cached, no connection, no such model."""
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise LookupError("huggingface_hub is not installed") from None
    try:
        cached = hub.try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache's marker: the model is known to have no such file
            return None
        return Path(hub.hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError:  # an EntryNotFoundError too: caught first
        raise LookupError(f"{filename} is not cached and the hub cannot be reached") from None
    except EntryNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LookupError(f"{filename}: {e}") from None


def _read(name: str, find: Callable[[str], Path | None]) -> Configured:
    """The pipeline a sentence-transformers model folder lists, with `find(relative path)` giving a
    file of it or None: modules.json names the Pooling module's folder (else `1_Pooling`) and the
    modules after it; the Pooling folder's config.json sets the mode (mean where there is none)."""
    modules = find("modules.json")
    folder, after = "1_Pooling", ()
    if modules is not None:
        listed = json.loads(modules.read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in listed]
        if "Pooling" not in kinds:
            return Configured(name, modes=None)
        at = kinds.index("Pooling")
        folder = listed[at]["path"]
        after = tuple((kinds[i], str(listed[i].get("path", ""))) for i in range(at + 1, len(listed)))
    config = find(str(PurePosixPath(folder, "config.json")))
    if config is None:
        return Configured(name, after=after)
    settings = json.loads(config.read_text())
    if "pooling_mode" in settings:
        modes = (str(settings["pooling_mode"]).lower(),)
    else:
        modes = tuple(
            mode for key, (mode, default) in SENTENCE_TRANSFORMERS.items() if settings.get(key, default)
        )
    return Configured(name, modes, f"{folder}/config.json", after)
