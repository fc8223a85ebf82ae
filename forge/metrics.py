"""What a run reports: console lines, out_dir/metrics.jsonl, out_dir/train_config.json and Weights & Biases.

Only the writer (rank 0) prints or writes; on other ranks every method is a no-op, so the loop
calls them unconditionally. metrics.jsonl holds one JSON object per log or eval step and survives
resumes: on resume the records of steps at or after the checkpoint's iteration are dropped (the
file is rewritten atomically), so no step appears twice. A record torn by a crash is skipped by
read_metrics() and repaired at the next start.
"""
import json
import math
import os
import secrets
import string
import subprocess
import time
from pathlib import Path

from forge.errors import UserError
from forge.io import atomic_write, first_line, os_reason

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"  # not config.json: out_dir may be a Hugging Face folder, whose config.json it is


def process_start_time() -> float:
    """When this process started, as time.time() reads (Linux: from /proc, to 10 ms), so that time-to-loss
    figures include Python's start and the imports (~3 s with torch); elsewhere, the time of this import."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


RUN_START_ENV = "GPTFORGE_RUN_START"  # set by forge.cpulaunch in its workers: the start of the command the user ran
PROCESS_START = float(os.environ.get(RUN_START_ENV) or process_start_time())  # time_s counts from here


def git_commit(repo_dir=None) -> str:
    """The commit the code runs from (`git rev-parse HEAD`), or 'unknown' outside a git checkout."""
    repo_dir = repo_dir or Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def read_metrics(path) -> list:
    """The records of a metrics.jsonl; a torn (partly written) line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _json_number(value):
    """JSON has no NaN/inf: write them as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLog:
    """Console, metrics.jsonl and W&B for one run; `enabled=False` (ranks > 0) makes every call a no-op."""

    def __init__(self, out_dir, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / METRICS_NAME
        self._file = None
        self._wandb_run = None

    # --- console
    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    # --- files
    def write_config(self, config: dict) -> str:
        """out_dir/train_config.json: the resolved config and the git commit (atomic); logs both. Returns the commit."""
        commit = git_commit()
        if self.enabled:
            payload = json.dumps({"git_commit": commit, "config": config}, indent=2) + "\n"
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self.out_dir / CONFIG_NAME, lambda f: f.write(payload.encode("utf-8")))
            except OSError as exc:
                raise UserError(f"cannot write to out_dir {self.out_dir}: {os_reason(exc)}; "
                                "choose a writable --out_dir") from None
            self.info(f"git commit {commit}; config: " + json.dumps(config, separators=(", ", "=")))
        return commit

    def start(self, start_iter: int) -> None:
        """Open metrics.jsonl for appending, first dropping records at or after start_iter (and a torn line)."""
        if not self.enabled:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [r for r in read_metrics(self.path) if isinstance(r.get("iter"), int) and r["iter"] < start_iter]
                text = "".join(json.dumps(r) + "\n" for r in kept)
                atomic_write(self.path, lambda f: f.write(text.encode("utf-8")))
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:  # e.g. a full disk: the old metrics.jsonl is intact (atomic rewrite)
            raise UserError(f"cannot write {self.path}: {os_reason(exc)}; free disk space or choose a "
                            "writable --out_dir") from None

    def _record(self, record: dict) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as exc:  # e.g. a full disk; drop the file so that close() does not fail again
                file, self._file = self._file, None
                try:
                    file.close()
                except OSError:
                    pass
                raise UserError(f"cannot write {self.path}: {os_reason(exc)}; free disk space or choose a "
                                "writable --out_dir") from None
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if v is not None})

    def log_step(self, iter_num: int, loss: float, lr: float, grad_norm: float, ms, tokens_per_sec, mfu=None) -> None:
        """One training line: loss, lr, gradient norm before clipping, ms/iter, tokens/s, MFU (None: unknown).

        ms None: a step that is not timed (it compiled the model); tokens/s and MFU are then None too."""
        if not self.enabled:
            return
        mfu_text = f", mfu {mfu * 100:.2f}%" if mfu is not None else ""
        timing = f"{ms:.1f} ms/iter, {tokens_per_sec:,.0f} tok/s{mfu_text}" if ms is not None else "not timed (compiling)"
        self.info(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.3e}, grad norm {grad_norm:.3f}, {timing}")
        self._record({"iter": iter_num, "loss": _json_number(loss), "lr": lr, "grad_norm": _json_number(grad_norm),
                      "ms": ms, "tokens_per_sec": tokens_per_sec, "mfu": _json_number(mfu),
                      "time_s": time.time() - PROCESS_START})

    def log_eval(self, iter_num: int, train_loss: float | None, val_loss: float, lr: float,
                 extra: dict | None = None) -> None:
        """An evaluation line; `extra` adds named scores to it and to the record (e.g. hellaswag_acc_norm).
        train_loss None (eval_train=False): the train split was not evaluated, and neither says it."""
        if not self.enabled:
            return
        losses = {"train_loss": train_loss} if train_loss is not None else {}
        scores = {**losses, "val_loss": val_loss, **(extra or {})}
        self.info(f"step {iter_num}: " + ", ".join(f"{name.replace('_loss', ' loss')} {value:.4f}"
                                                   for name, value in scores.items()))
        self._record({"iter": iter_num, **{name: _json_number(value) for name, value in scores.items()},
                      "lr": lr, "time_s": time.time() - PROCESS_START})

    # --- Weights & Biases
    def start_wandb(self, project: str, run_name: str, config: dict, run_id=None):
        """Start (or, given the stored run_id, continue) a W&B run with files under out_dir/wandb; returns its id."""
        if not self.enabled:
            return run_id
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True but the wandb package is not installed: pip install wandb, "
                            "or set --wandb_log=False") from None
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._wandb_run = wandb.init(project=project, name=run_name, config=config, id=run_id, resume="allow",
                                         dir=str(self.out_dir))
        except Exception as exc:  # no login, no network: say so instead of a traceback
            raise UserError(f"wandb could not start ({first_line(exc)}); run `wandb login`, set WANDB_MODE=offline, "
                            "or --wandb_log=False") from None
        # Records carry their iteration: a resumed run re-logs the steps after its checkpoint against "iter".
        self._wandb_run.define_metric("iter")
        self._wandb_run.define_metric("*", step_metric="iter")
        return run_id

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
