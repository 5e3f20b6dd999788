"""Running the training scripts as a user does: a fresh interpreter per run, from the repository root."""
import os
import signal
import subprocess
import sys
import time
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


def run_and_signal(*args: str, log_file: Path, at_record: int, sig: int = signal.SIGTERM,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """`python <args>`, sent `sig` once `log_file` holds `at_record` training records (one per step with
    --print-freq 1); the run finishes whatever it is doing when the signal lands. Returns like `run_script`."""
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        if sum('"mode": "train"' in line for line in lines) >= at_record:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
