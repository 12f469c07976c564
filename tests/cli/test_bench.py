"""`iros bench ...` on a plain install: a bench that needs an optional package says which extra brings it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    """Without httpx (a plain install), `iros bench routing` fails with one line saying what to install."""
    shadow = tmp_path / "httpx"
    shadow.mkdir()
    # What importing a package that is not installed raises.
    missing = "raise ModuleNotFoundError(\"No module named 'httpx'\", name='httpx')\n"
    (shadow / "__init__.py").write_text(missing)
    done = subprocess.run(
        [sys.executable, "-m", "iros", "bench", "routing", "--requests", "10"],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'iros[bench]'" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
