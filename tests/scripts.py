"""Running the training scripts as a user does: a fresh interpreter per run, from the repository root."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, expect_ok: bool = True, launcher: tuple[str, ...] = (sys.executable,),
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`python <args>` (or `launcher <args>`); by default insist that it succeeds and show its output if not."""
    result = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, **(env or {})})
    if expect_ok:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result
