"""Helpers for tests that run the entry points as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# A CUDA device this machine lacks, on any machine: cuda:0 without a GPU, cuda:N with N GPUs
ABSENT_GPU = f"cuda:{torch.cuda.device_count()}"


def run_py(*args, cwd=REPO, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run `python *args` from the repository root with the test environment; capture text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A bad input must end with a non-zero exit, no traceback, and one `error:` line naming the culprit."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected failure, got exit 0\n{output}"
    assert "Traceback" not in output, f"traceback shown to the user:\n{output}"
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, f"expected exactly one 'error:' line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), f"{needle!r} not named in: {error_lines[0]}"
    return error_lines[0]


def snapshot(path: Path) -> dict:
    """Every file under path with its bytes, to assert that nothing already written changed."""
    path = Path(path)
    if not path.exists():
        return {}
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def end_spawned_worker() -> None:
    """Leave an mp.spawn worker once its process group is destroyed and its results are written, without
    the interpreter's finalisation: there, torch 2.11's gloo work objects can still be freed and abort the
    process ("terminate called without an active exception", SIGABRT) after everything checked is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
