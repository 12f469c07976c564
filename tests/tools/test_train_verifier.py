"""scripts/train-verifier: the verifier's training, outside the wheel, still starts from its wrapper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_the_wrapper_runs_the_training_from_tools() -> None:
    """The script finds tools/verifier/prior.py (and scikit-learn) and describes its options."""
    done = subprocess.run(
        [str(REPO / "scripts" / "train-verifier"), "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "usage: train-verifier" in done.stdout
    assert "--out" in done.stdout


def test_training_writes_where_the_cache_reads() -> None:
    """Its default output is the verifier.json the semantic cache loads (iros/cache/verifier/)."""
    from iros.cache.verifier.model import PACKAGED, Verifier
    from tools.verifier import data

    default = data.ROOT / "iros" / "cache" / "verifier" / PACKAGED
    assert default.is_file()
    assert Verifier.load().neighbours >= 1
