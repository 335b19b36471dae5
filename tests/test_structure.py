"""scripts/structure.py: the folders are layers, and the check fails on an import against them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "structure.py"


def structure(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True)


def test_the_package_keeps_its_layers():
    done = structure(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 import cycles, 0 imports against the layers, 0 private cross-module imports" in done.stdout


def test_an_import_against_the_layers_fails(tmp_path):
    shutil.copytree(REPO / "quietstar", tmp_path / "quietstar",
                    ignore=shutil.ignore_patterns("__pycache__"))
    rollout = tmp_path / "quietstar" / "method" / "rollout.py"
    rollout.write_text(rollout.read_text() + "\nfrom quietstar.training.optim import build_optimizer\n")
    done = structure(tmp_path)
    assert done.returncode == 1
    assert ("import against the layers: quietstar.method.rollout imports quietstar.training.optim "
            "(method may import ['utils'])") in done.stdout


def test_a_private_import_and_a_cycle_fail(tmp_path):
    shutil.copytree(REPO / "quietstar", tmp_path / "quietstar",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sampling = tmp_path / "quietstar" / "method" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\nfrom quietstar.method.vocab import _HeadLogprob\n")
    done = structure(tmp_path)
    assert done.returncode == 1
    assert "private import: quietstar.method.sampling imports quietstar.method.vocab._HeadLogprob" in done.stdout
    assert "cycle: quietstar.method.sampling <-> quietstar.method.vocab" in done.stdout
