"""CI's reduced form of scripts/kill_test.py: 10 SIGKILLs at random moments, auto_resume after each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ten_kills_lose_nothing(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "kill_test.py"), "--quick", "--kills", "10", "--seed", "3",
         "--work", str(tmp_path / "work"), "--json", str(summary)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["kills"] == 10 and result["processes_started"] == 11
    assert all(result["checks"].values()), result["checks"]
