"""`tokenfuse bench --task vlm` on a few images: every row has its columns, the full model is the
reference of every ratio, and the counts say what each operator kept."""

from __future__ import annotations

import pytest
from conftest import needs_vlm

from tokenfuse.cli import main
from tokenfuse.eval import bench_vlm

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def results():
    needs_vlm()
    return bench_vlm.run(
        methods="pool,resize,fastv",
        keeps=(0.25,),
        limit=8,
        batch_size=4,
        repeats=1,
        timing_images=4,
        progress=False,
    )


def test_rows_hold_quality_cost_and_counts(results):
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["full", "pool", "resize", "fastv"]
    full = rows["full"]
    assert full["speedup"] == 1.0 and full["generation_speedup"] == 1.0
    assert full["visual"] == 1.0 and full["agreement"] == 100.0 and full["kl"] == pytest.approx(0, abs=1e-6)
    assert all(r["images"] == 8 for r in rows.values())
    # 144 visual tokens per image -> 36 at the boundary; FastV keeps 144 in layers 0-1, 36 in 2-29
    assert rows["pool"]["visual"] == pytest.approx(36 / 144)
    assert rows["resize"]["visual"] == pytest.approx(36 / 144)
    assert rows["fastv"]["visual"] == pytest.approx((2 * 144 + 28 * 36) / (30 * 144))
    assert rows["resize"]["flops"] < rows["pool"]["flops"] < rows["fastv"]["flops"] < 1.0  # resize: tower too
    for r in rows.values():
        assert 0 <= r["answer_acc"] <= 100 and r["kl"] >= 0 and r["speedup"] > 0


def test_the_command_line_refuses_other_models_for_the_vlm_task(capsys):
    assert main(["bench", "--task", "vlm", "--model", "minilm"]) == 2
    assert "packaged VLM" in capsys.readouterr().err
