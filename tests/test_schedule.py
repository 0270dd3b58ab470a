from itertools import pairwise

import pytest

from tokenfuse.core import schedule


@pytest.mark.parametrize("layers", [1, 4, 6, 12])
@pytest.mark.parametrize("keep", [0.35, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("at_embeddings", [True, False])
def test_geometric_schedule_spends_exactly_the_budget(layers, keep, at_embeddings):
    if keep <= 1 / (2 * layers) + 0.05 and not at_embeddings:
        pytest.skip("below what a method without the embedding point can reach")
    s = schedule.geometric(keep, layers, at_embeddings=at_embeddings)
    assert len(s) == layers + 1
    assert schedule.work(s) == pytest.approx(keep, abs=1e-9)
    assert all(b <= a for a, b in pairwise(s))
    assert (s[0] == 1.0) != at_embeddings


def test_keep_one_removes_nothing():
    assert schedule.geometric(1.0, 6) == [1.0] * 7
    assert schedule.work([1.0] * 7) == 1.0


@pytest.mark.parametrize("keep", [0, -0.1, 1.01, "0.5", True])
def test_invalid_keep_is_refused(keep):
    with pytest.raises(ValueError, match="keep must be"):
        schedule.check_keep(keep)


def test_unreachable_keep_is_refused():
    with pytest.raises(ValueError, match="below what"):
        schedule.geometric(0.1, 4, at_embeddings=False)


def test_explicit_schedule_is_checked():
    assert schedule.check_schedule([1, 0.8, 0.5], 2) == [1.0, 0.8, 0.5]
    with pytest.raises(ValueError, match="3 reduction points"):
        schedule.check_schedule([0.8, 0.5], 2)
    with pytest.raises(ValueError, match="non-increasing"):
        schedule.check_schedule([0.5, 0.8, 0.4], 2)


@pytest.mark.parametrize("gamma", [0.05, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("first", [0, 1])
def test_power_schedules_spend_exactly_the_budget(gamma, first):
    try:
        s = schedule.power(0.5, 6, gamma, first)
    except ValueError:
        assert gamma >= 1.0  # back-loaded shapes cannot reach low budgets
        return
    assert len(s) == 7 and s[:first] == [1.0] * first
    assert schedule.work(s) == pytest.approx(0.5, abs=1e-9)
    assert all(b <= a for a, b in pairwise(s))


def test_power_front_loaded_removes_early_and_back_loaded_late():
    early, late = schedule.power(0.7, 6, 0.2), schedule.power(0.7, 6, 2.0)
    assert early[0] < late[0] and early[-1] > late[-1]
    assert schedule.power(1.0, 6, 0.5) == [1.0] * 7
    with pytest.raises(ValueError, match="below what"):
        schedule.power(0.2, 6, 2.0)


def test_nudge_moves_one_point_and_keeps_the_budget():
    s = schedule.power(0.5, 6, 0.3, first=1)
    for point in range(1, 7):
        for factor in (1.2, 0.8):
            moved = schedule.nudge(s, point, factor)
            if moved is None:
                continue
            assert moved[0] == 1.0  # a whole point stays whole
            assert schedule.work(moved) == pytest.approx(0.5, abs=1e-6)
            assert all(b <= a for a, b in pairwise(moved))
    up = schedule.nudge(s, 2, 1.1)
    assert up[2] > s[2] and up[-1] < s[-1]
    assert schedule.nudge(s, 0, 1.1) is None


@pytest.mark.parametrize("layers", [2, 6, 12])
@pytest.mark.parametrize("at_embeddings", [True, False])
def test_geometric_never_asks_more_than_a_method_can_remove(layers, at_embeddings):
    least = schedule.least_work(layers, at_embeddings, max_removal=0.5)
    for keep in (least + 1e-3, (least + 1) / 2):
        s = schedule.geometric(keep, layers, at_embeddings, max_removal=0.5)
        assert schedule.work(s) == pytest.approx(keep, abs=1e-9)
        assert all(b >= 0.5 * a - 1e-12 for a, b in pairwise([1.0, *s]))  # at most half of each point
    with pytest.raises(ValueError, match=f"removing at most 0.5 .* must be above {least:.6g}"):
        schedule.geometric(least, layers, at_embeddings, max_removal=0.5)


def test_a_schedule_is_checked_before_its_model_is_known():
    assert schedule.check_fractions([1, 0.5]) == [1.0, 0.5]
    for bad in ([0.5], [0.5, 0.0], [0.4, 0.5]):
        with pytest.raises(ValueError, match="schedule"):
            schedule.check_fractions(bad)
    with pytest.raises(schedule.LayerCountError, match="3 reduction points"):
        schedule.check_schedule([0.8, 0.5], 2)
