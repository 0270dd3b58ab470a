"""Calibration: the search finds what its objective prefers within its time, configurations load
and apply, the command runs end to end on held-out documents."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS

import tokenfuse
from tokenfuse import cli
from tokenfuse.assets import fmnist
from tokenfuse.core import schedule as sched
from tokenfuse.eval import calibrate, metrics, speed_match
from tokenfuse.eval.calibrate.speed import BAND, FINAL_BAND, search_at_speed
from tokenfuse.eval.measure import Config, Pass

AIM = math.sqrt(BAND[0] * BAND[1])  # where a keep search aims: the band's geometric centre


def test_search_finds_the_preferred_method_shape_and_option():
    """A synthetic objective: mctf beats the others, front-loaded shapes near gamma 0.2 score best,
    and proportional attention off is a small gain. Every trial spends exactly the budget."""

    def score(c: calibrate.Candidate) -> np.ndarray:
        s = 1.0 if c.method == "mctf" else 0.5
        s -= 0.0 if c.gamma is None else 0.1 * abs(torch.log(torch.tensor(c.gamma / 0.2))).item()
        s -= 0.2 if c.gamma is None else 0.0
        return np.full(8, s + (0.01 if c.options.get("prop_attn") is False else 0.0))

    trials = calibrate.search(score, keep=0.5, num_layers=6, methods=("tome", "mctf"), time_limit=60)
    best = trials[0].candidate
    assert best.method == "mctf" and best.options == {"prop_attn": False}
    assert best.gamma == pytest.approx(0.2, rel=0.25)
    assert all(sched.work(t.candidate.schedule) == pytest.approx(0.5, abs=1e-6) for t in trials)
    assert [t.score for t in trials] == sorted((t.score for t in trials), reverse=True)  # chosen = best


def test_changes_need_evidence_beyond_the_noise_of_the_calibration_set():
    """The first method's best shape (ToMe, gamma 0.3) is the choice to beat: a later method's best
    (PiToMe, same shape) and every refinement gain 0.001 on average. Taken when all eight inputs
    agree; refused when the gain is one input's luck (+0.015 on it, -0.001 on the seven others)."""

    def objective(gain: np.ndarray):
        def score(c: calibrate.Candidate) -> np.ndarray:
            if c.options or c.nudged or (c.gamma is not None and c.gamma not in calibrate.SHAPES):
                return 1.0 + gain
            if c.gamma == 0.3:
                return 1.0 + (gain if c.method == "pitome" else 0.0)
            return np.full(8, 0.5)

        return score

    def chosen(gain: np.ndarray) -> calibrate.Trial:
        methods = ("tome", "pitome")
        return calibrate.search(objective(gain), keep=0.5, num_layers=6, methods=methods, time_limit=60)[0]

    agreed = chosen(np.full(8, 0.001))
    assert agreed.score == pytest.approx(1.001)
    lucky = chosen(np.array([0.015] + [-0.001] * 7))
    assert lucky.candidate == calibrate.shaped("tome", 0.5, 6, 0.3) and lucky.score == 1.0


def test_a_shape_must_beat_the_constant_schedule_beyond_noise():
    """The papers' constant schedule is the choice a shape must beat: a shape better on average by
    one input's luck (+0.015 on it, -0.001 on the seven others) is refused, one better on every
    input is taken."""

    def chosen(gain: np.ndarray) -> calibrate.Trial:
        def score(c: calibrate.Candidate) -> np.ndarray:
            return np.full(8, 1.0) if c.gamma is None else (1.0 + gain if c.gamma == 0.3 else np.full(8, 0.5))

        return calibrate.search(score, keep=0.5, num_layers=6, methods=("tome",), time_limit=5, z=1.0)[0]

    assert chosen(np.array([0.015] + [-0.001] * 7)).candidate == calibrate.constant("tome", 0.5, 6)
    assert chosen(np.full(8, 0.001)).candidate.gamma is not None


def test_option_variants_get_a_schedule_they_can_run():
    """ToMe on hidden states may reduce at the embeddings; on keys it cannot (there are none yet)."""
    trials = calibrate.search(
        lambda c: np.full(4, -c.schedule[0]), keep=0.5, num_layers=6, methods=("tome",), time_limit=5
    )
    keys = [t.candidate for t in trials if t.candidate.options.get("similarity") == "keys"]
    assert keys and all(c.schedule[0] == 1.0 for c in keys)
    for c in (t.candidate for t in trials):
        tokenfuse.methods.make(c.method, **c.apply_options())  # every candidate is a valid method


def test_a_variant_that_cannot_reach_the_budget_is_skipped():
    """ToMe removes at most half of the tokens at a point, and on keys it cannot reduce before the first
    layer: on 4 layers its least work is 0.176 on hidden states and 0.352 on keys. At keep 0.25 with
    the constant schedule chosen, stage 2 built the keys variant and the search stopped with an error
    (a --speedup budget corrected by a slow measurement got there)."""
    trials = calibrate.search(
        lambda c: np.full(4, 1.0 if c.gamma is None else 0.0), keep=0.25, num_layers=4, methods=("tome",)
    )
    assert trials[0].candidate == calibrate.constant("tome", 0.25, 4)
    assert not any(t.candidate.options.get("similarity") == "keys" for t in trials)
    assert calibrate.constant("tome", 0.25, 4, {"similarity": "keys"}) is None
    with pytest.raises(ValueError, match="keep 0.1 is below what evit can reach on 4 layers"):
        calibrate.search(lambda c: np.zeros(4), keep=0.1, num_layers=4, methods=("evit",))


def test_search_stops_at_its_time_limit_after_one_trial():
    trials = calibrate.search(lambda c: np.zeros(4), keep=0.5, num_layers=6, time_limit=0)
    assert len(trials) == 1


def test_apply_takes_a_calibrated_configuration(tmp_path):
    model = MODELS["bert"](layers=4)
    config = {
        "method": "tome",
        "options": {"prop_attn": False},
        "schedule": [1.0, 0.8, 0.6, 0.5, 0.4],
        "keep": 0.6,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    for given in (path, config):
        patch = tokenfuse.patch_of(tokenfuse.apply(model, config=given))
        assert patch.method.name == "tome" and patch.method.prop_attn is False
        assert patch.schedule == config["schedule"]
    with pytest.raises(ValueError, match="not found"):
        tokenfuse.apply(model, config=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="lacks"):
        tokenfuse.apply(model, config={"method": "tome"})


@pytest.mark.integration
@pytest.mark.slow
def test_calibrate_command_end_to_end(tmp_path, capsys):
    out, results = tmp_path / "config.json", tmp_path / "results.json"
    args = ["calibrate", "--keep", "0.5", "--calib-size", "4", "--holdout", "8", "--time-limit", "3"]
    args += ["--method", "tome", "--max-length", "128", "--short-length", "32", "--eval-repeats", "1"]
    assert cli.main([*args, "--no-progress", "--out", str(out), "--json", str(results)]) == 0
    config = json.loads(out.read_text())
    assert config["found"]["objective"].endswith("documents cut to 128 and 32 tokens")  # both lengths
    assert config["method"] == "tome" and sched.work(config["schedule"]) == pytest.approx(0.5, abs=1e-6)
    assert config["found"]["calib_size"] == 4 and config["found"]["calibration_inputs"] == [8, 12]
    evaluation = json.loads(results.read_text())
    rows = {r["name"]: r for r in evaluation["rows"]}
    assert set(rows) == {"full", "calibrated", "constant", "truncation"}
    assert all(0 < r["cosine"] <= 1.0001 and r["speedup"] > 0 for r in rows.values())
    assert rows["calibrated"]["options"]["schedule"] == config["schedule"]  # the configuration written
    # 8 held-out documents of 5 classes: no 10-NN accuracy (it printed 0.0), a note says why
    assert not any("bbc_knn_acc" in r for r in rows.values())
    assert any(n.startswith("bbc_knn_acc left out") for n in evaluation["notes"])
    printed = next(line for line in capsys.readouterr().out.splitlines() if "calibrated" in line)
    assert f"{rows['calibrated']['cosine']:.3f}" in printed and "BBC acc" not in printed
    # bench benches the configuration beside the usual rows
    bench_json = tmp_path / "bench.json"
    bench = [
        "bench",
        "--config",
        str(out),
        "--method",
        "tome",
        "--limit",
        "8",
        "--repeats",
        "1",
        "--data",
        "bbc",
    ]
    assert cli.main([*bench, "--max-length", "128", "--no-progress", "--json", str(bench_json)]) == 0
    bench_rows = json.loads(bench_json.read_text())["rows"]
    assert [r["name"] for r in bench_rows] == ["full", "tome", "config"]
    assert bench_rows[2]["options"]["schedule"] == config["schedule"]
    assert not any("bbc_knn_acc" in r for r in bench_rows)


@pytest.fixture
def tiny_text_model(tmp_path, tokenizer) -> Path:
    """A folder holding a tiny random BERT and the packaged tokenizer: `--model PATH` runs in seconds."""
    folder = tmp_path / "tiny-bert"
    MODELS["bert"](layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def scripted_timings(task, configs, repeats, step=lambda _: None, slower: float = 1.0, by_method=None):
    """`measure.timings` with known times, for the speed search: the full model 1 s, truncation keep s,
    a method 1.1 keep s (its overhead), `slower` times that, and times `by_method[name]` where given.
    A tiny model's real speedups are all overhead and load."""
    seconds = {"full": lambda k: 1.0, "truncation": lambda k: k}
    factor = {} if by_method is None else by_method
    return [
        [
            Pass(
                {},
                np.zeros((1, 1, 2)),
                seconds.get(c.method, lambda k, m=c.method: 1.1 * slower * factor.get(m, 1.0) * k)(c.keep),
                0.0,
            )
        ]
        * repeats
        for c in configs
    ]


@pytest.mark.parametrize(
    ("slower", "preferred", "above", "chosen_gamma"),
    [(1.0, 0.5, 0.42, 0.5), (1.08, 0.5, 0.42, None), (1.08, 1.0, 0.0, None)],
)
def test_the_final_keep_is_timed_on_the_timing_set_where_a_shape_must_beat_the_constant(
    monkeypatch, slower, preferred, above, chosen_gamma
):
    """Stage 5 of the search at a speed: the choice's keep is searched again on the timing set (here
    the method runs `slower` there than on the calibration set), and a shape that won at the
    calibration set's keep stays only if it reaches the speed and beats its method's constant
    schedule there. The scripted objective prefers power `preferred` above work `above` and the
    constant below it: truncation@0.5 is matched at keep 0.431 on the calibration set, at 0.441 on
    a timing set as fast (the final band's margin is smaller), and at 0.409 on one 8% slower, which
    power 0.5 can reach and lose at, and power 1.0 cannot reach (its least keep is 0.429)."""
    calibration, timing = object(), object()

    def timings(task, configs, repeats, step=lambda _: None):
        return scripted_timings(task, configs, repeats, step, slower if task is timing else 1.0)

    def score(candidate):
        bonus = 0.02 if sched.work(candidate.schedule) > above else -0.02
        return np.linspace(0.9, 0.91, 8) + (bonus if candidate.gamma == preferred else 0.0)

    monkeypatch.setattr(speed_match, "timings", timings)
    target = Config("truncation", 0.5)
    chosen = search_at_speed(score, calibration, timing, target, 0.5, 6, ("tome",), 1.0, calibrate.config_of)
    assert BAND[0] <= chosen.ratios["calibration set"] <= BAND[1]
    assert FINAL_BAND[0] <= chosen.ratios["timing set"] <= FINAL_BAND[1]
    assert chosen.ratios["timing set"] == pytest.approx(0.5 / (1.1 * slower * chosen.keep))
    best = chosen.trials[0].candidate
    assert sched.work(best.schedule) == pytest.approx(chosen.keep, abs=1e-6)
    assert best.gamma == chosen_gamma
    assert (chosen.constant is not None) == (chosen_gamma is not None)  # the rival a shape beat, recorded
    assert chosen.probes[-1] == (chosen.keep, chosen.ratios["timing set"])  # stage 5's probes, recorded
    assert chosen.keep == pytest.approx(0.441 if slower == 1.0 else 0.409, abs=0.002)


def test_methods_are_compared_at_one_speed_the_centre_of_the_band(monkeypatch):
    """Stage 1: each method's keep, wherever in the band its probes landed, is moved to where they
    put the band's centre, so that the methods are searched and compared at one speed. Scripted
    speeds (MCTF 7% slower than ToMe at a keep) are exactly as 1 / keep, so the moved keeps are
    exact and stage 3 confirms them at once; the scripted score is the schedule's work, so each
    recorded score is its keep's."""

    def timings(task, configs, repeats, step=lambda _: None):
        return scripted_timings(task, configs, repeats, by_method={"mctf": 1.07})

    def score(candidate):
        return np.full(8, sched.work(candidate.schedule))

    monkeypatch.setattr(speed_match, "timings", timings)
    target, methods = Config("truncation", 0.5), ("tome", "mctf")
    chosen = search_at_speed(score, object(), object(), target, 0.5, 6, methods, 1.0, calibrate.config_of)
    for method, slower in (("tome", 1.0), ("mctf", 1.07)):
        at = chosen.methods[method]
        assert at["speed_over_target"] == pytest.approx(AIM)
        assert at["keep"] == pytest.approx(0.5 / (1.1 * slower * AIM), rel=1e-6)
        assert at["calibration_score"] == pytest.approx(at["keep"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [["--speed-of", "truncation@0.5"], ["--speedup", "2"]])
def test_calibrate_at_a_speed_finds_the_keep_that_reaches_it(tiny_text_model, tmp_path, monkeypatch, budget):
    """At truncation's speed at keep 0.5 (or 2x), on scripted times: every method's keep is searched
    to its margin over the target's speed (keep 0.5 / 1.1, 3% to 8% below it); the configuration records its
    speed over the target's on the calibration set, and its held-out speed and quality; the
    evaluation compares it with the baseline at its own keep."""
    monkeypatch.setattr(speed_match, "timings", scripted_timings)
    out, results = tmp_path / "config.json", tmp_path / "results.json"
    args = ["calibrate", "--model", str(tiny_text_model), *budget, "--calib-size", "4", "--timing-size", "8"]
    args += ["--holdout", "6", "--time-limit", "1", "--method", "tome,mctf", "--max-length", "64"]
    args += ["--eval-repeats", "1", "--no-progress", "--out", str(out), "--json", str(results)]
    assert cli.main(args) == 0
    config = json.loads(out.read_text())
    ratios = config["found"]["speed_over_target"]
    assert config["found"]["objective"].endswith("cut to 64 tokens")  # the short length is not below 64
    assert BAND[0] >= 1.03 and BAND[0] <= ratios["calibration set"] <= BAND[1]
    assert FINAL_BAND[0] >= 1.01 and FINAL_BAND[0] <= ratios["timing set"] <= FINAL_BAND[1]
    assert ratios["timing set"] == pytest.approx(0.5 / (1.1 * config["keep"]))
    assert [config["keep"], ratios["timing set"]] in config["found"]["timing_probes"]
    assert config["found"]["timing_inputs"] == [10, 18]  # after 6 held out and 4 calibration texts
    methods = config["found"]["methods_at_speed"]  # what stage 4 chose among: each method at speed
    assert set(methods) == {"tome", "mctf"}
    for method in methods.values():
        assert BAND[0] <= method["speed_over_target"] <= BAND[1]
        assert method["speed_over_target"] == pytest.approx(0.5 / (1.1 * method["keep"]))
    assert methods[config["method"]]["speed_over_target"] == pytest.approx(ratios["calibration set"])
    assert sched.work(config["schedule"]) == pytest.approx(config["keep"], abs=1e-6)
    rows = {r["name"]: r for r in json.loads(results.read_text())["rows"]}
    baseline = "truncation@0.5" if "--speed-of" in budget else "truncation"
    assert set(rows) == {"full", "calibrated", "constant", baseline}
    assert rows[baseline]["keep"] == (0.5 if "--speed-of" in budget else config["keep"])
    assert "lp50_pearson" in rows["calibrated"] and "lp50_pearson" in rows[baseline]  # LP50, as the bench
    measured = config["measured"]
    assert measured["speedup"] == rows["calibrated"]["speedup"]
    assert measured["cosine"] == rows["calibrated"]["cosine"]
    assert measured["target_speedup"] == (rows[baseline]["speedup"] if "--speed-of" in budget else 2.0)
    patch = tokenfuse.patch_of(tokenfuse.apply(MODELS["bert"](layers=4), config=out))  # apply takes it
    assert patch.schedule == config["schedule"]


def test_calibrate_errors_name_the_fix(capsys):
    assert cli.main(["calibrate", "--keep", "0.5", "--method", "nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert cli.main(["calibrate", "--keep", "0.5", "--calib-size", "2000"]) == 2
    assert "lower --calib-size" in capsys.readouterr().err
    assert cli.main(["calibrate", "--speedup", "0.5"]) == 2
    assert "above 1" in capsys.readouterr().err


def test_fit_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    logits = rng.normal(size=(2000, 5))
    logits[np.arange(2000), labels] += 1.0  # a calibrated model's logits...
    log_probs = 3.0 * logits  # ...made overconfident by a factor of 3
    t = calibrate.fit_temperature(log_probs, labels)
    assert 2.5 < t < 3.5
    probs = torch.softmax(torch.tensor(log_probs / t), -1).numpy()
    sharp = torch.softmax(torch.tensor(log_probs), -1).numpy()
    assert metrics.nll(probs, labels) < metrics.nll(sharp, labels)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
@pytest.mark.integration
def test_classifier_calibration_fits_a_temperature_that_apply_uses(tmp_path):
    out, results = tmp_path / "config.json", tmp_path / "results.json"
    args = ["calibrate", "--model", "fmnist-vit", "--keep", "0.5", "--fit-temperature", "--calib-size", "32"]
    args += [
        "--holdout",
        "64",
        "--time-limit",
        "2",
        "--eval-repeats",
        "1",
        "--method",
        "tome",
        "--no-progress",
    ]
    assert cli.main([*args, "--out", str(out), "--json", str(results)]) == 0
    config = json.loads(out.read_text())
    assert config["temperature"] > 0 and config["found"]["calibration_inputs"] == [64, 96]
    rows = {r["name"]: r for r in json.loads(results.read_text())["rows"]}
    assert set(rows) == {"full", "calibrated", "calibrated + temperature", "constant", "resize"}
    plain, scaled = rows["calibrated"], rows["calibrated + temperature"]
    assert plain["accuracy"] == scaled["accuracy"] and {"ece", "nll"} <= set(scaled)
    model = fmnist.load_classifier()
    pixels = fmnist.to_pixels(fmnist.load("test", limit=4)[0])
    with torch.inference_mode():
        tokenfuse.apply(model, config=out)
        with_t = model(pixel_values=pixels).logits
        tokenfuse.apply(model, config={**config, "temperature": 1.0})
        without = model(pixel_values=pixels).logits
    assert torch.allclose(with_t * config["temperature"], without, atol=1e-5)
