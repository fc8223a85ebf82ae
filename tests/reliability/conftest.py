"""Fixtures of the reliability suite: a fork server that starts entry-point processes in milliseconds,
and the tiny training configuration every run here uses."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.util import REPO

FORKSERVER = Path(__file__).with_name("forkserver.py")

# A tiny CPU run: ~0.05 s per step, a checkpoint at every evaluation (every 2 steps).
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2, bias=True,
            dropout=0.1, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, eval_iters=2, log_interval=1,
            eval_interval=2, always_save_checkpoint=True, device="cpu", dtype="float32", compile=False)


def cli(out_dir, data_dir, **overrides) -> list:
    """train.py's --key=value arguments for the tiny run."""
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
            for k, v in {**TINY, "out_dir": str(out_dir), "data_dir": str(data_dir), **overrides}.items()]


@dataclass
class Finished:
    """What subprocess.run returns, as far as tests/util.assert_clean_error reads it."""
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Child:
    pid: int
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


class ForkServer:
    """Start `python SCRIPT ARGS` processes forked from a server that has already imported torch."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._count = itertools.count()
        # one intra-op thread per child: on 2 shared cores, more threads only wait for each other
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._server = subprocess.Popen([sys.executable, str(FORKSERVER)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def _ask(self, request: dict) -> dict:
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self._server.poll()})")
        return json.loads(line)

    def ping(self) -> None:
        """Wait until the server has done its imports (so that timings measure the runs alone)."""
        assert self._ask({"op": "ping"})["ready"]

    def start(self, script: str, *args, env: dict | None = None) -> Child:
        n = next(self._count)
        child = Child(0, self.log_dir / f"{n}.out", self.log_dir / f"{n}.err")
        child.stdout_path.touch()
        child.stderr_path.touch()
        child.pid = self._ask({"op": "run", "script": script, "argv": [str(a) for a in args],
                               "stdout": str(child.stdout_path), "stderr": str(child.stderr_path),
                               "env": env or {}})["pid"]
        return child

    def wait(self, child: Child, timeout: float = 300):
        """The child's exit code (-N for signal N), or None if it is still running after timeout seconds."""
        return self._ask({"op": "wait", "pid": child.pid, "timeout": timeout})["returncode"]

    def kill(self, child: Child, sig=signal.SIGKILL) -> None:
        """Signal the child's process group (the child and any worker processes it started)."""
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass

    def run(self, script: str, *args, env: dict | None = None, timeout: float = 300) -> Finished:
        child = self.start(script, *args, env=env)
        code = self.wait(child, timeout)
        if code is None:
            self.kill(child)
            self.wait(child)
            raise AssertionError(f"{script} {args} still running after {timeout}s:\n{child.stdout()}{child.stderr()}")
        return Finished(code, child.stdout(), child.stderr())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.kill()  # its children have all been waited for; skip the interpreter's slow torch teardown
        self._server.wait()


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """In-process runs on one thread, like the forked ones: on 2 shared cores two threads spin against each
    other (a tiny model's step is 100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forked_logs"))
    server.ping()
    yield server
    server.close()


def wait_for(predicate, timeout: float = 120, interval: float = 0.002):
    """Poll until predicate() is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
