"""The one measurement protocol of the benches: warm-up, interleaved rounds, medians, ratios to the
full model of the same run, notes; text inputs tokenized before the clock, once per prefix."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from transformers import BertConfig

import tokenfuse
from tokenfuse.api.progress import progress_bar
from tokenfuse.eval import bench_text, measure, metrics
from tokenfuse.eval.measure import FULL, Config, Pass


class Scripted:
    """A task whose passes take the seconds and process the tokens it is given, recording its calls."""

    name = "scripted"

    def __init__(self, seconds: dict[str, list[float]], tokens: dict[str, int]):
        self.model = SimpleNamespace(config=BertConfig(hidden_size=8, intermediate_size=32))
        self.seconds, self.tokens, self.calls = seconds, tokens, []

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        self.calls.append(("warm-up" if warm_up else "run", config.title))
        seconds = 100.0 if warm_up else self.seconds[config.title].pop(0)
        trace = np.full((2, 3, 2), self.tokens[config.title])  # (inputs, layers, 2)
        return Pass({"x": np.zeros((2, 1))}, trace, seconds, scoring=seconds / 10)

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        self.calls.append(("quality", config.title))
        return timed

    def head(self, config: Config) -> dict:
        return {"name": config.title}

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict:
        warnings.warn("the same note from every row", stacklevel=1)
        return {"seen_full_tokens": int(full.layer_tokens[0, 0, 0])}


def test_rounds_are_interleaved_and_rows_are_medians_relative_to_the_full_model():
    # medians differ from means: full 1.0 (mean 4.0), tome 0.5 (mean 2.0)
    task = Scripted({"full": [1.0, 10.0, 1.0], "tome": [5.0, 0.5, 0.5]}, {"full": 40, "tome": 20})
    with progress_bar(False) as bar:
        rows, notes = measure.compare(task, [FULL, Config("tome", 0.5)], repeats=3, bar=bar)
    assert task.calls == [
        ("warm-up", "full"),
        *[("run", name) for _ in range(3) for name in ("full", "tome")],
        ("quality", "full"),
        ("quality", "tome"),
    ]
    full, tome = rows
    assert tome["speedup"] == pytest.approx(2.0) and tome["seconds"] == pytest.approx(0.5)
    assert full["speedup"] == pytest.approx(1.0) and full["seconds"] == pytest.approx(1.0)
    assert tome["scoring"] == pytest.approx(0.05)  # the median share, not the mean
    assert tome["tokens"] == pytest.approx(0.5)
    flops = [metrics.encoder_flops(np.full((2, 3), n), np.full((2, 3), n), 8, 32) for n in (20, 40)]
    assert tome["flops"] == pytest.approx(flops[0] / flops[1])
    assert tome["seen_full_tokens"] == 40 and tome["name"] == "tome" and tome["keep"] == 0.5
    assert notes == ["the same note from every row"]


def test_the_first_configuration_must_be_the_full_model():
    task = Scripted({"tome": [1.0]}, {"tome": 1})
    with progress_bar(False) as bar, pytest.raises(ValueError, match="first configuration must be the full"):
        measure.compare(task, [Config("tome", 0.5)], repeats=1, bar=bar)
    assert task.calls == []


def test_speedup_is_the_ratio_of_medians_after_a_warm_up():
    task = Scripted({"full": [2.0, 3.0, 2.0], "tome": [1.0, 1.0, 9.0]}, {"full": 4, "tome": 2})
    assert measure.speedup(task, Config("tome", 0.5), repeats=3) == pytest.approx(2.0)
    assert task.calls[0] == ("warm-up", "full") and len(task.calls) == 7


class Clock:
    """A stand-in for the protocol's clock: a millisecond passes at each reading, and whatever
    `spend` says."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


class SlowTokenizer:
    """The packaged tokenizer, taking a second of the clock on each call that tokenizes the documents."""

    def __init__(self, tokenizer, clock: Clock):
        self.tokenizer, self.clock, self.tokenized = tokenizer, clock, 0

    def __call__(self, text, **kwargs):
        if isinstance(text, list):
            self.tokenized += 1
            self.clock.spend(1.0)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_text_is_tokenized_before_the_clock_once_per_prefix(tokenizer, texts, monkeypatch):
    """The bench timed tokenization with the model (`encode_batches` inside the clock), once per
    pass: a slow tokenizer showed in every configuration's time. Truncation keeps its own prefix."""
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    model = tiny_bert()
    slow = SlowTokenizer(tokenizer, clock)
    task = bench_text.TextTask("tiny", model, slow, texts, batch_size=2, max_length=32)
    configs = [FULL, Config("tome", 0.5), Config("truncation", 0.5)]
    passes = measure.timings(task, configs, repeats=2)
    # full and tome share the documents' batches; truncation's prefix is tokenized in each batch of
    # documents (`parts`, which timings interleaves), once over the rounds and over later timings
    assert slow.tokenized == 1 + len(task.parts())
    measure.timings(task, [FULL, configs[2]], repeats=1)
    assert slow.tokenized == 1 + len(task.parts())
    assert all(p.seconds < 0.01 for timed in passes for p in timed)
    # rows in input order, as embed gives them; the trace of each document
    expected = tokenfuse.embed(model, tokenizer, texts, batch_size=2, max_length=32).numpy()
    np.testing.assert_allclose(passes[0][0].outputs["embedding"], expected, atol=1e-6)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert passes[0][0].layer_tokens[:, 0, 0].tolist() == lengths
    truncated = passes[2][0].layer_tokens[:, 0, 0]
    assert np.all(truncated < lengths) and np.all(truncated >= np.array(lengths) // 2)
    assert tokenfuse.patch_of(model) is None  # every pass leaves the model unreduced


def test_a_pass_puts_batches_back_in_input_order_and_times_the_forward(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    batches = [torch.tensor([2.0, 0.0]), torch.tensor([1.0])]

    def forward(batch):
        clock.spend(1.0)
        return {"value": batch}, torch.ones(2, 2, len(batch), dtype=torch.long)

    p = measure.run_pass(tiny_bert(layers=2), FULL, True, batches, forward, order=[2, 0, 1])
    assert p.outputs["value"].tolist() == [0.0, 1.0, 2.0]
    assert p.layer_tokens.shape == (3, 2, 2) and p.seconds == pytest.approx(2.001) and p.scoring == 0.0


class Parted(Scripted):
    """A scripted task on four inputs in two parts (positions 3, 1 and 0, 2), each part's rows
    holding their positions, each part's pass taking half its configuration's seconds."""

    def __init__(self, seconds: dict[str, list[float]], positions=((3, 1), (0, 2))):
        super().__init__(seconds, {name: 4 for name in seconds})
        self.positions = positions

    def parts(self):
        return [(Part(self, i, at), at) for i, at in enumerate(self.positions)]


class Part:
    def __init__(self, whole: Parted, index: int, at: tuple[int, ...]):
        self.whole, self.index, self.at = whole, index, at

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        self.whole.calls.append((f"part {self.index}", config.title))
        seconds = self.whole.seconds[config.title][0] / 2
        if self.index == 1:
            self.whole.seconds[config.title].pop(0)
        rows = np.array(self.at, dtype=float)[:, None]
        return Pass(
            {"x": rows}, np.repeat(rows[:, None], 3, 1).repeat(2, 2), seconds, scoring=0.1 * self.index
        )


def test_a_round_runs_every_configuration_on_each_part_in_turn_and_joins_them():
    """On a shared machine, speed moves within seconds: configurations take turns a batch at a time,
    and each round's pass is the parts' joined, rows back at their positions."""
    task = Parted({"full": [2.0, 4.0], "tome": [1.0, 1.0]})
    passes = measure.timings(task, [FULL, Config("tome", 0.5)], repeats=2)
    parts = [(f"part {i}", name) for i in (0, 1) for name in ("full", "tome")]
    assert task.calls == [("warm-up", "full"), *parts, *parts]
    full, tome = passes
    assert [p.seconds for p in full] == [2.0, 4.0] and [p.seconds for p in tome] == [1.0, 1.0]
    assert full[0].outputs["x"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert full[0].layer_tokens[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert full[1].scoring == pytest.approx(0.05)  # the parts' shares, weighted by their seconds


def test_a_configuration_on_another_runtime_is_timed_whole():
    """A runtime model is built (and compiled) for a task's inputs: its task is not split."""
    task = Parted({"full": [2.0], "tome+int8": [1.0]})
    measure.timings(task, [FULL, Config("tome", 0.5, runtime="int8")], repeats=1)
    assert task.calls == [("warm-up", "full"), ("run", "full"), ("run", "tome+int8")]


@pytest.mark.parametrize("batch_size", [2, 64])
def test_text_timed_a_batch_at_a_time_gives_the_whole_pass(tokenizer, texts, batch_size):
    """The joined pass of the parts is the pass of the whole task: the same batches, rows in order,
    also where one batch holds every text (sorted by length)."""
    model = tiny_bert()
    task = bench_text.TextTask("tiny", model, tokenizer, texts, batch_size=batch_size, max_length=32)
    configs = [FULL, Config("tome", 0.5), Config("truncation", 0.5)]
    assert len(task.parts()) == -(-len(texts) // batch_size)
    passes = measure.timings(task, configs, repeats=1)
    for config, timed in zip(configs, passes, strict=True):
        whole = task.run(config)
        np.testing.assert_allclose(timed[0].outputs["embedding"], whole.outputs["embedding"], atol=1e-6)
        np.testing.assert_array_equal(timed[0].layer_tokens, whole.layer_tokens)
