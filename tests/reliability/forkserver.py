"""A fork server for the reliability tests: import torch and the entry points once, then fork one
child per run, so that dozens of runs (and kills) cost milliseconds instead of an interpreter
start each.

A child is a real process running `python SCRIPT ARGS...` as the user would (runpy as __main__,
its own stdout/stderr files, its own process group), so `kill -9`, SIGTERM, exit codes and
tracebacks are the real ones. The server itself never runs any torch operation, so forking it is
safe. Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

    {"op": "run", "script": "train.py", "argv": [...], "stdout": PATH, "stderr": PATH, "env": {...}}
        -> {"pid": PID}
    {"op": "wait", "pid": PID, "timeout": SECONDS}  -> {"returncode": CODE or -SIGNAL, or null on timeout}
"""
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import importlib  # noqa: E402

import torch  # noqa: E402,F401  the expensive import, done once
import torch._dynamo  # noqa: E402,F401  imported lazily by the first optimizer: 2 s per process otherwise

# The entry points' own imports, done once too. One that fails here fails again, with its real error,
# when a child runs that entry point; the others keep working.
for _name in ("train", "sample", "evaluate", "bench", "forge.tokenize"):
    try:
        importlib.import_module(_name)
    except Exception:
        pass


def child(request: dict) -> None:
    """In the forked child: become `python script argv...` and exit with its status."""
    os.setpgid(0, 0)  # its own process group: a kill reaches its worker processes too
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.environ.update(request.get("env") or {})
    script = str(REPO / request["script"])
    sys.argv = [script, *request["argv"]]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter would do with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_exit_codes = {}  # pid -> exit code of the children already reaped, so a later wait still answers


def wait(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        if pid in _exit_codes:
            return _exit_codes[pid]
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _exit_codes[pid] = os.waitstatus_to_exitcode(status)
            continue
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child(request)
            try:
                os.setpgid(pid, pid)  # also here, so that the group exists before the caller can signal it
            except OSError:  # the child already did it (or already exited)
                pass
            reply = {"pid": pid}
        elif request["op"] == "ping":  # answered once the imports are done
            reply = {"ready": True}
        elif request["op"] == "wait":
            reply = {"returncode": wait(request["pid"], request.get("timeout", 300))}
        else:
            reply = {"error": f"unknown op {request['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
