"""The CPU benchmark in one command: our CPU defaults against the classic recipe, interleaved.

    python bench/cpu.py                              # every part, 3 rounds
    python bench/cpu.py --parts=steps --rounds=5     # only the step time

Each round runs every variant once, back to back, so that a shared machine's load falls on all of
them alike; the summary gives each variant's median over the rounds, the ratios of the medians,
and the load average around every run. Two CPU kinds: 'bf16' is matmul_precision='medium' (bf16
matmul products where the CPU has AMX / AVX512-BF16, float32 elsewhere) and 'fp32' is
matmul_precision='high', which stands in for a CPU without bf16 hardware.

The classic recipe is nanoGPT's CPU command for the baby GPT on Tiny Shakespeare characters
(4 layers x 4 heads x 128, block 64, batch 12, AdamW lr 1e-3 decayed over 2000 steps, 20-batch
evaluations every 250 steps), run as nanoGPT runs it: one process with torch's default threads,
float32 matmuls; bench.py's step also takes the for-loop AdamW and glibc's default allocator.
It is also what `make run` trained before config/shakespeare_char_cpu.py changed ("today").

Parts:
- steps: bench.py's median ms per optimizer step of that model: classic vs our default (one
  process per physical core, one thread each; the same 12 sequences as 2 micro-batches of 6).
- classic: the classic recipe's full run, continued past step 2000 at its final lr until val loss
  <= 1.886 (at most 4000 steps): its time to 1.886 from the command's start, and its time to step
  2000, which is what `make run` took before ("today", fp32); with 'makerun', also today's run
  with bf16 matmul products (2000 steps, our code as it was: fused AdamW, one process).
- speedrun: config/shakespeare_char_speedrun_cpu.py's time from the command's start to val loss
  <= 1.886 (the comparison: 'classic').
- makerun: config/shakespeare_char_cpu.py, what `make run` trains now: time to its last evaluation
  from the command's start, and that val loss (the comparison: 'classic').
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forge.metrics import read_metrics  # noqa: E402

TARGET = 1.886
KINDS = {"bf16": "medium", "fp32": "high"}
MODEL = ["--dataset=shakespeare_char", "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--dropout=0.0",
         "--bias=False", "--mlp=gelu_exact", "--device=cpu", "--compile=False"]
CLASSIC = [*MODEL, "--batch_size=12", "--gradient_accumulation_steps=1", "--learning_rate=1e-3", "--lr_decay_iters=2000",
           "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=100", "--eval_interval=250", "--eval_iters=20",
           "--log_interval=50", "--always_save_checkpoint=False", "--cpu_procs=1"]
CLASSIC_STEP = ["--batch_size=12", "--gradient_accumulation_steps=1", "--cpu_procs=1", "--matmul_precision=high",
                "--adamw_impl=for-loop", "--retain_freed_memory=False"]
OUR_STEP = ["--batch_size=6", "--gradient_accumulation_steps=2"]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run(args: list, timeout: float, out_dir: Path | None = None, stop_below: float | None = None):
    """(seconds of wall time, stdout) of `python *args`; with stop_below, SIGTERM once out_dir's metrics
    report a val loss at or under it (the rest of a run that already got there is not needed)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # every variant chooses its own threads
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            if time.monotonic() - start > timeout or (stop_below is not None and crossing(out_dir, stop_below)):
                proc.send_signal(signal.SIGTERM)  # train.py saves and exits
                break
            time.sleep(0.5)
        proc.wait()
        log.seek(0)
        return time.monotonic() - start, log.read()


def evals(out_dir: Path) -> list:
    path = out_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if "val_loss" in r] if path.exists() else []


def crossing(out_dir: Path, target: float):
    """The first evaluation record at or under target, or None."""
    return next((r for r in evals(out_dir) if r["val_loss"] <= target), None)


def step_ms(kind: str | None, timeout: float, steps: int) -> tuple:
    args = ["bench.py", *MODEL, f"--steps={steps}", "--warmup_steps=5", "--phase_steps=0"]
    args += CLASSIC_STEP if kind is None else [*OUR_STEP, f"--matmul_precision={KINDS[kind]}"]
    _, out = run(args, timeout)
    found = re.search(r"ms/iter [\d.]+ \(median ([\d.]+)", out)
    return (float(found.group(1)) if found else None), out


def train_run(args: list, out_dir: Path, timeout: float, stop_below=None) -> tuple:
    shutil.rmtree(out_dir, ignore_errors=True)
    wall, out = run(["train.py", *args, f"--out_dir={out_dir}"], timeout, out_dir, stop_below)
    return wall, evals(out_dir), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="steps,classic,speedrun,makerun",
                        help="comma-separated: steps, classic, speedrun, makerun")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of each bench.py run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped and reported as such")
    parser.add_argument("--work_dir", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-cpu-"))
    results = {}  # variant -> [value of each round]

    def record(name, value, extra=""):
        results.setdefault(name, []).append(value)
        print(f"  {name}: {'-' if value is None else f'{value:.2f}'} {extra}(load {load()})", flush=True)

    print(f"bench/cpu.py: {os.cpu_count()} logical CPUs, load {load()}, runs in {work}", flush=True)
    for rnd in range(1, args.rounds + 1):
        print(f"round {rnd}", flush=True)
        if "steps" in parts:
            for kind in (None, *KINDS):
                ms, out = step_ms(kind, args.timeout, args.steps)
                record(f"step ms, {'classic' if kind is None else 'ours ' + kind}", ms, "" if ms else out[-400:])
        if "classic" in parts:
            wall, records, out = train_run([*CLASSIC, "--max_iters=4000", "--matmul_precision=high"], work / "classic",
                                           args.timeout, stop_below=TARGET)
            hit = crossing(work / "classic", TARGET)
            at2000 = next((r for r in records if r["iter"] == 2000), None)
            record("classic: s to 1.886", hit and hit["time_s"], f"(iter {hit and hit['iter']}, wall {wall:.0f} s) ")
            record("makerun fp32, today: s", at2000 and at2000["time_s"],
                   f"(val {at2000['val_loss']:.4f}) " if at2000 else out[-400:])
        for kind, precision in KINDS.items():
            if "speedrun" in parts:
                out_dir = work / f"speedrun-{kind}"
                wall, records, out = train_run(["config/shakespeare_char_speedrun_cpu.py", f"--matmul_precision={precision}"],
                                               out_dir, args.timeout)
                hit = crossing(out_dir, TARGET)
                record(f"speedrun {kind}: s to 1.886", hit and hit["time_s"],
                       f"(val {hit['val_loss']:.4f} at iter {hit['iter']}, wall {wall:.0f} s) " if hit else
                       f"(not reached: {records[-1:]}) ")
            if "makerun" in parts:
                if kind == "bf16" and "classic" in parts:
                    wall, records, out = train_run([*CLASSIC, "--max_iters=2000", f"--matmul_precision={precision}"],
                                                   work / "today-bf16", args.timeout)
                    record("makerun bf16, today: s", records[-1]["time_s"] if records else None,
                           f"(val {records[-1]['val_loss']:.4f}) " if records else out[-400:])
                wall, records, out = train_run(["config/shakespeare_char_cpu.py", f"--matmul_precision={precision}"],
                                               work / f"makerun-{kind}", args.timeout)
                record(f"makerun {kind}, new: s", records[-1]["time_s"] if records else None,
                       f"(val {records[-1]['val_loss']:.4f}, wall {wall:.0f} s) " if records else out[-400:])

    print("\nsummary (median over rounds; ratios of medians)")
    median = {name: statistics.median([v for v in values if v is not None]) if any(v is not None for v in values)
              else None for name, values in results.items()}
    for name, values in results.items():
        shown = " / ".join("-" if v is None else f"{v:.2f}" for v in values)
        print(f"  {name}: {shown}  median {median[name] if median[name] is None else round(median[name], 2)}")
    pairs = [("step ms, classic", f"step ms, ours {kind}", f"steps per second, ours {kind} / classic") for kind in KINDS]
    pairs += [("classic: s to 1.886", f"speedrun {kind}: s to 1.886", f"time to 1.886, classic / speedrun {kind}")
              for kind in KINDS]
    pairs += [(f"makerun {kind}, today: s", f"makerun {kind}, new: s", f"make run time, today / new {kind}")
              for kind in KINDS]
    for base, ours, label in pairs:
        if median.get(base) and median.get(ours):
            print(f"  {label}: {median[base] / median[ours]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
