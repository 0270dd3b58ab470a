"""The tree's layers hold: each package imports only those below it, and the library imports with
torch alone."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

needs_linter = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (dev extra)")


def lint(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env={"PYTHONPATH": str(src), "PATH": str(LINT.parent)},
        capture_output=True,
        text=True,
    )


@needs_linter
def test_layer_contracts_are_kept():
    result = lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@needs_linter
@pytest.mark.parametrize(
    ("module", "edge"),
    [
        ("core/schedule.py", "from ..api import apply"),  # the core reaching up to the API
        ("api/patching.py", "from ..eval import calibrate"),  # the old apply(config=) -> calibrate edge
        ("methods/tome.py", "import numpy"),  # the core layers import torch alone
    ],
)
def test_a_back_edge_fails_the_check(tmp_path, module, edge):
    shutil.copytree(ROOT / "src" / "tokenfuse", tmp_path / "tokenfuse")
    path = tmp_path / "tokenfuse" / module
    path.write_text(path.read_text() + "\n" + edge + "\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


def test_import_tokenfuse_needs_torch_alone():
    """numpy, rich, transformers and the rest are blocked; the library imports and reduces tokens
    (the script `make test` also runs in an environment with torch alone)."""
    script = ROOT / "scripts" / "torch_alone.py"
    result = subprocess.run([sys.executable, str(script), "--block"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tokenfuse imports and reduces with torch")
