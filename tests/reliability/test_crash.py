"""Crash consistency of training: kill -9 and SIGTERM at seeded random moments, then resume.

One uninterrupted reference run (shared by the tests of this module) is compared, weight for weight,
with runs that were killed over and over and resumed with init_from=auto each time.
"""
import json
import random
import re
import signal
import time

import pytest
import torch

from forge.checkpoint import load_checkpoint
from forge.metrics import read_metrics
from tests.reliability.conftest import cli, wait_for

# 22 interruptions never finish the run early: each waits for at most 4 steps and kills before the next one is
# logged, so it moves the checkpoint on by at most 6 (one more for the polling delay, one to the next even step)
MAX_ITERS = 140
EVAL_INTERVAL = 2  # a checkpoint every 2 steps, so kills land inside saves
KILL_SEED, MIN_KILLS = 7, 22
TEAR_EVERY = 5  # after every 5th kill, metrics.jsonl also gets a torn last line, which the resume must repair
TERM_SEED, TERMS = 11, 6
KEEP_LAST = 2  # numbered copies ckpt-<iter>.pt kept besides ckpt.pt
ITER_LINE = r"^iter \d+:"  # train.py logs every training step (log_interval=1)
RUN = dict(max_iters=MAX_ITERS, lr_decay_iters=MAX_ITERS, eval_interval=EVAL_INTERVAL, init_from="auto",
           keep_last=KEEP_LAST)


@pytest.fixture(scope="module")
def reference(forks, tmp_path_factory, tiny_char_data):
    """The uninterrupted run, started at once and running alongside the interrupted ones; call it for
    (out_dir, checkpoint, metrics records)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    child = forks.start("train.py", *cli(out, tiny_char_data, **RUN))
    result = []

    def finished():
        if not result:
            code = forks.wait(child, 600)
            assert code == 0, child.stdout() + child.stderr()
            result.extend([out, load_checkpoint(out), read_metrics(out)])
        return result

    return finished


def assert_same_run(out_dir, reference) -> None:
    """The interrupted run ended where the reference did, with identical weights, optimizer and records."""
    ref_dir, ref_ckpt, ref_records = reference()
    ckpt = load_checkpoint(out_dir)
    assert ckpt["iter_num"] == ref_ckpt["iter_num"] == MAX_ITERS
    assert ckpt["model"].keys() == ref_ckpt["model"].keys()
    for name, tensor in ref_ckpt["model"].items():
        assert torch.equal(tensor, ckpt["model"][name]), f"weights differ from the uninterrupted run: {name}"
    for index, state in ref_ckpt["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ckpt["optimizer"]["state"][index][key])), key
    # metrics.jsonl: every line whole (a torn line was repaired), each step once, the same losses
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["iter"] for r in records if "loss" in r]
    evals = [r["iter"] for r in records if "val_loss" in r]
    assert steps == list(range(MAX_ITERS)), "a step is missing or appears twice in metrics.jsonl"
    assert evals == list(range(0, MAX_ITERS + 1, EVAL_INTERVAL)), "an evaluation is missing or appears twice"
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in ref_records if "loss" in r]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [r["val_loss"] for r in ref_records if "val_loss" in r]
    assert not [p.name for p in out_dir.iterdir() if ".tmp" in p.name], "temporary files of killed writes were left"
    numbered = sorted(out_dir.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    kept = [MAX_ITERS - EVAL_INTERVAL * i for i in reversed(range(KEEP_LAST))]
    assert [p.name for p in numbered] == [f"ckpt-{i}.pt" for i in kept]
    assert [torch.load(p, map_location="cpu", weights_only=True)["iter_num"] for p in numbered] == kept
    assert numbered[-1].read_bytes() == (out_dir / "ckpt.pt").read_bytes()


class Watcher:
    """Reads a child's stdout as it grows and counts the lines of each kind."""

    def __init__(self, child):
        self.child, self.text = child, ""

    def count(self, pattern: str) -> int:
        self.text = self.child.stdout()
        return len(re.findall(pattern, self.text, flags=re.MULTILINE))

    def wait_at_most(self, seconds: float, steps_logged: int) -> None:
        """Wait `seconds`, or less once `steps_logged` training lines are out: a kill at a random moment that
        never lets the run get a step further than the lines it waits for, however fast the machine."""
        wait_for(lambda: self.count(ITER_LINE) >= steps_logged, timeout=seconds)


def check_after_crash(out_dir, last_iter: int, pid: int) -> tuple[int, bool, bool]:
    """What a crash may leave: a checkpoint that loads (weights_only) and never goes back, metrics whose
    only possibly torn line is the last. Returns (checkpoint iter, a save was interrupted, last line torn)."""
    iter_num = last_iter
    path = out_dir / "ckpt.pt"
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        iter_num = ckpt["iter_num"]
        assert iter_num % EVAL_INTERVAL == 0 and iter_num >= last_iter, (iter_num, last_iter)
        assert ckpt["model"] and ckpt["optimizer"]["state"]
    torn = False
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        raw = metrics.read_text(encoding="utf-8")
        lines = raw.split("\n")
        for line in lines[:-1]:
            json.loads(line)  # every complete line is a whole record
        torn = lines[-1] != ""
    return iter_num, (out_dir / f".ckpt.pt.tmp.{pid}").exists(), torn


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(forks, tmp_path, tiny_char_data, reference):
    """>= 22 kill -9 at seeded random moments (startup, mid-step, inside checkpoint saves), init_from=auto after each."""
    rng = random.Random(KILL_SEED)
    out = tmp_path / "out"
    kills, iter_num, inside_save, torn_lines, resumes, moments = 0, 0, 0, 0, 0, []
    while kills < MIN_KILLS or (inside_save == 0 and kills < 3 * MIN_KILLS):
        child = forks.start("train.py", *cli(out, tiny_char_data, **RUN))
        watch = Watcher(child)
        moment = rng.choice(["startup", "save", "save", "step", "step"])
        if moment == "startup":  # while resuming: loading the checkpoint, rewriting metrics.jsonl, first eval
            watch.wait_at_most(rng.uniform(0.0, 0.3), 1)
        elif moment == "save":  # the k-th evaluation line is printed right before its checkpoint is saved
            k = rng.choice([2, 3])
            assert wait_for(lambda: watch.count(r"^step \d+:") >= k or forks.wait(child, 0) is not None), child.stderr()
            watch.wait_at_most(rng.uniform(0.0, 0.02), watch.count(ITER_LINE) + 1)
        else:  # in the middle of training steps
            k = rng.randint(1, 4)
            assert wait_for(lambda: watch.count(ITER_LINE) >= k or forks.wait(child, 0) is not None), child.stderr()
            watch.wait_at_most(rng.uniform(0.0, 0.05), k + 1)
        forks.kill(child)
        code = forks.wait(child, 60)
        assert code == -signal.SIGKILL, f"the run ended by itself (exit {code}) after {kills} kills:\n{child.stderr()}"
        kills += 1
        resumed = re.search(r"^resuming from .* at iter (\d+)", child.stdout(), flags=re.MULTILINE)
        if resumed:  # the run continued from the checkpoint the previous kill left
            assert int(resumed.group(1)) == iter_num, (resumed.group(0), iter_num)
            resumes += 1
        iter_num, interrupted_save, torn = check_after_crash(out, iter_num, child.pid)
        inside_save += interrupted_save
        metrics = out / "metrics.jsonl"
        if kills % TEAR_EVERY == 0 and metrics.exists() and not torn:
            # a kill in the middle of writing a record (too short a window to hit at random): a torn last line
            whole = read_metrics(metrics)
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(f'{{"iter": {iter_num}, "loss": 3.1')
            assert read_metrics(metrics) == whole, "a reader did not skip the torn last line"
            torn, torn_lines = True, torn_lines + 1
        moments.append((moment, iter_num, interrupted_save, torn))
    print(f"{kills} kills, {inside_save} inside a checkpoint save, {resumes} resumed; (moment, ckpt iter, in save, torn metrics): {moments}")
    assert inside_save >= 1, "no kill landed inside a checkpoint save"
    assert torn_lines >= MIN_KILLS // TEAR_EVERY
    assert resumes >= MIN_KILLS // 2, f"only {resumes} runs got as far as resuming"

    done = forks.run("train.py", *cli(out, tiny_char_data, **RUN))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(out, reference)


def test_sigterm_at_random_moments_saves_within_one_step_and_exits_0(forks, tmp_path, tiny_char_data, reference):
    """SIGTERM mid-run: exit 0 promptly, a checkpoint of at most the step in progress + 1; resuming each time
    ends with the uninterrupted run's weights."""
    rng = random.Random(TERM_SEED)
    out = tmp_path / "out"
    for _ in range(TERMS):
        child = forks.start("train.py", *cli(out, tiny_char_data, **RUN))
        watch = Watcher(child)
        k = rng.randint(1, 6)
        assert wait_for(lambda: watch.count(ITER_LINE) >= k), child.stdout() + child.stderr()
        watch.wait_at_most(rng.uniform(0.0, 0.05), k + 1)
        forks.kill(child, signal.SIGTERM)
        sent = time.monotonic()
        code = forks.wait(child, 60)
        elapsed = time.monotonic() - sent
        stdout, stderr = child.stdout(), child.stderr()
        assert code == 0, stdout + stderr
        assert elapsed < 30, f"took {elapsed:.1f}s to stop after SIGTERM"
        before, _, after = stdout.partition("SIGTERM received")
        assert after, stdout
        logged = [int(i) for i in re.findall(r"^iter (\d+):", before, flags=re.MULTILINE)]
        in_progress = logged[-1] + 1 if logged else 0  # the step running when the handler ran
        saved = load_checkpoint(out)["iter_num"]
        assert saved == int(re.search(r"stopped at iter (\d+)", after).group(1))
        assert logged[-1] + 1 <= saved <= in_progress + 1, (logged[-1], saved)
        assert all(int(i) < saved for i in re.findall(r"^iter (\d+):", after, flags=re.MULTILINE))
        assert "Traceback" not in stderr
    done = forks.run("train.py", *cli(out, tiny_char_data, **RUN))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(out, reference)
