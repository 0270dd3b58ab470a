"""Bad arguments of the benches and of calibration fail with a clear error before anything loads."""

import pytest

from tokenfuse import cli
from tokenfuse.eval import bench_text, bench_vision, calibrate


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_length": 0}, "max_length must be at least 1, got 0"),  # was: nothing truncated
        ({"max_length": -5}, "max_length must be at least 1, got -5"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"limit": 0}, "limit must be at least 1, got 0"),
        ({"limit": -1}, "limit must be at least 1, got -1"),  # was: all documents but one
        ({"repeats": 0}, "repeats must be at least 1, got 0"),
    ],
)
def test_text_bench_checks_its_counts_first(nothing_loads, arguments, message):
    with pytest.raises(ValueError, match=message):
        bench_text.run(progress=False, **arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"limit": 0}, "limit must be at least 1, got 0"),
        ({"limit": -3}, "limit must be at least 1, got -3"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),  # was: the default batch
        ({"repeats": 0}, "repeats must be at least 1, got 0"),
    ],
)
def test_vision_bench_checks_its_counts_first(nothing_loads, arguments, message):
    with pytest.raises(ValueError, match=message):
        bench_vision.run(progress=False, **arguments)


@pytest.mark.parametrize("run", [calibrate.run_text, calibrate.run_classifier])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"calib_size": 1}, "calib_size must be at least 2, got 1"),  # no standard error on one input
        ({"calib_size": 0}, "calib_size must be at least 2, got 0"),
        ({"holdout": 0}, "holdout must be at least 1, got 0"),  # was: the default 400 (500 images)
        ({"holdout": -1}, "holdout must be at least 1, got -1"),
        ({"repeats": 0}, "repeats must be at least 1, got 0"),
        ({"eval_repeats": 0}, "eval_repeats must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"max_length": 0}, "max_length must be at least 1, got 0"),
    ],
)
def test_calibration_checks_its_counts_first(nothing_loads, run, arguments, message):
    with pytest.raises(ValueError, match=message):
        run(calibrate.Settings(keep=0.5, progress=False, **arguments))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--limit", "0"], "limit must be at least 1, got 0; give a positive --limit"),
        (["bench", "--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["bench", "--task", "vision", "--limit", "0"], "limit must be at least 1, got 0"),
        (["calibrate", "--keep", "0.5", "--holdout", "0"], "holdout must be at least 1, got 0"),
        (["calibrate", "--keep", "0.5", "--calib-size", "1"], "give a larger --calib-size"),
    ],
)
def test_the_command_line_says_what_is_wrong_in_one_line(nothing_loads, capsys, argv, message):
    """The command line passed 0 on as "not given" (the default 400 documents, 16 per batch)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in " ".join(err.split())
