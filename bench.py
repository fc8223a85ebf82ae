"""Measure training throughput: ms/iter, tokens/s, MFU, peak memory, and where the time goes.

    python bench.py config/owt.py --real_data=False             # GPT-2 124M on random tokens
    python bench.py config/shakespeare_char_cpu.py --steps=200  # the CPU configuration on its data
    python bench.py config/owt.py --real_data=False --profile=True   # + a torch.profiler trace
    torchrun --nproc_per_node=8 bench.py config/owt.py --real_data=False   # per-GPU figures under DDP

The model, optimizer, precision, compile and parallelism come from the same config keys as
train.py, and the timed step is train.py's own train_step. Three passes after warm-up:
1. `steps` optimizer steps back to back, timed with CUDA events (perf_counter on CPU), no host sync
   inside: ms/iter, tokens/s, MFU, peak memory.
2. `phase_steps` steps with a sync between data, forward, backward and the optimizer: the share of
   each (the syncs cost a little, so this pass is slower than the first).
3. With --profile=True, `profile_steps` steps under torch.profiler: a chrome trace in out_dir.
"""
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from configurator import ConfigError, TrainConfig, load_config
from forge.cpu import retain_freed_memory
from forge.cpulaunch import run_on_cpu_cores
from forge.data import TokenBatches, load_meta
from forge.distributed import all_reduce_mean, destroy, gradient_sync, init_distributed
from forge.errors import run_main
from forge.flops import device_peak_flops
from forge.lora import prepare_finetune
from forge.precision import autocast, resolve_dtype, set_matmul_precision
from forge.tokenize import DataError
from train import (accumulation_per_rank, create_model, model_vocab_size, optimizer_step, parallelize_and_build_optimizer,
                   seed_everything, train_step)

PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class BenchConfig(TrainConfig):
    warmup_steps: int = 5  # untimed optimizer steps first (compilation, allocator, caches)
    steps: int = 20  # optimizer steps timed back to back for ms/iter, tokens/s and MFU
    phase_steps: int = 10  # steps of a second pass timing data, forward, backward and optimizer apart (0: skip)
    real_data: bool = True  # batches from the dataset's train.bin; False: random tokens, no dataset needed
    vocab_size: int = 0  # vocabulary of the random tokens; 0: the dataset's if it is prepared, else 50304
    profile: bool = False  # also run a few steps under torch.profiler and write a chrome trace to out_dir
    profile_steps: int = 5  # steps recorded in the profiler trace
    adamw_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # AdamW kernel; auto: the model's choice
    threads: int = 0  # torch.set_num_threads for this run; 0: torch's default
    retain_freed_memory: bool = True  # CPU: keep freed memory for reuse as train.py does; False: glibc's default (classic)

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "profile_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "phase_steps", "vocab_size", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")


class SyntheticBatches:
    """Random tokens made once on the device and cycled: the loader costs nothing, so the model is measured alone."""

    def __init__(self, vocab_size, batch_size, block_size, device, seed, pool=4):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (pool, batch_size, block_size + 1), generator=generator)
        self._batches = [(t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)) for t in tokens]
        self._i = 0

    def next(self):
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        return batch

    def close(self):
        pass


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device, backend=None if cfg.backend == "auto" else cfg.backend)
    batches = None
    try:
        grad_accum = accumulation_per_rank(cfg.gradient_accumulation_steps, dist.world_size)
        tokens_per_iter = grad_accum * cfg.batch_size * cfg.block_size  # this process's share
        dtype = resolve_dtype(cfg.dtype, dist.device)
        device_type = torch.device(dist.device).type
        seed_everything(cfg.seed + dist.rank)
        matmul_precision = set_matmul_precision(cfg.matmul_precision, dist.device)
        if device_type == "cpu" and cfg.retain_freed_memory:
            retain_freed_memory()  # as train.py does
        ctx = autocast(dist.device, dtype)

        batches, vocab_size = open_batches(cfg, dist)
        init = "scratch" if cfg.init_from in ("scratch", "resume", "auto") else cfg.init_from
        model, _, model_type = create_model(cfg, init, None, vocab_size)
        prepare_finetune(model, cfg, None, cfg.out_dir)  # finetune=lora: frozen base, adapters only, as train.py
        model.to(dist.device)
        scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
        module, optimizer = parallelize_and_build_optimizer(cfg, model, dist, dtype)  # as train.py does
        set_adamw_impl(optimizer, cfg.adamw_impl)
        say = print if dist.is_main else (lambda *a, **k: None)
        say(describe(cfg, model, model_type, dist, dtype, matmul_precision, vocab_size, tokens_per_iter, optimizer))

        def step():
            return train_step(module, optimizer, scaler, batches, grad_accum, ctx, cfg.grad_clip)  # train.py's

        t0 = time.perf_counter()
        for _ in range(cfg.warmup_steps):
            loss, _ = step()
        first_loss = float(loss) if cfg.warmup_steps else math.nan
        say(f"warm-up: {cfg.warmup_steps} steps in {time.perf_counter() - t0:.1f} s (compilation included)")

        reset_peak_memory(dist.device)
        cpu_start, faults_start = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step_ms, loss = time_steps(step, cfg.steps, dist.device)
        cpu_ms = 1000 * (time.process_time() - cpu_start) / cfg.steps
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start) / cfg.steps
        mean_ms = sum(step_ms) / len(step_ms)
        memory = peak_memory(dist.device)
        # ranks run in lockstep (collectives): average their means
        mean_ms = all_reduce_mean(torch.tensor([mean_ms], dtype=torch.float64, device=dist.device)).item()
        tokens_per_s = tokens_per_iter * dist.world_size / (mean_ms / 1000)
        peak_flops = cfg.peak_flops or device_peak_flops(dist.device, dtype)
        mfu = model.estimate_mfu(tokens_per_iter, mean_ms / 1000, peak_flops) if peak_flops else None
        achieved = model.flops_per_token() * tokens_per_iter / (mean_ms / 1000)

        say(f"loss {first_loss:.4f} after warm-up, {float(loss):.4f} at the end "
            f"({'random tokens' if not cfg.real_data else 'train split'})")
        say(f"ms/iter {mean_ms:.2f} (median {statistics.median(step_ms):.2f}, min {min(step_ms):.2f}, "
            f"max {max(step_ms):.2f}) over {cfg.steps} steps")
        # CPU seconds of all this process's threads: on a shared machine with --threads=1 it barely moves with
        # the load, so it compares two CPU settings fairly when wall-clock time cannot
        say(f"process CPU time {cpu_ms:.2f} ms/iter ({torch.get_num_threads()} threads), "
            f"{faults:,.0f} minor page faults/iter (memory the kernel maps in again)")
        say(f"tokens/s {tokens_per_s:,.0f}" + (f" ({dist.world_size} processes)" if dist.is_distributed else ""))
        say(f"achieved {flops(achieved)} per process; MFU " +
            (f"{100 * mfu:.1f}% of {flops(peak_flops)}" if mfu is not None else
             f"n/a (no peak FLOP/s known for {dist.device} in {str(dtype).removeprefix('torch.')}: pass --peak_flops)"))
        say(f"peak memory {memory}")

        if cfg.phase_steps:
            phases = time_phases(module, optimizer, scaler, batches, grad_accum, ctx, cfg.grad_clip,
                                 cfg.phase_steps, dist.device)
            total = sum(phases.values())
            shares = ", ".join(f"{name} {100 * phases[name] / total:.0f}%" for name in PHASES)
            say(f"time split: {shares} (second pass of {cfg.phase_steps} steps with a sync between phases: "
                f"{1000 * total / cfg.phase_steps:.2f} ms/iter)")
        if cfg.profile:
            trace = write_profile(module, optimizer, scaler, batches, grad_accum, ctx, cfg, dist)
            say(f"profiler trace ({cfg.profile_steps} steps): {trace}  (open in chrome://tracing or ui.perfetto.dev)")
    finally:
        if batches is not None:
            batches.close()
        destroy()


# ------------------------------------------------------------------------ set-up


def open_batches(cfg: BenchConfig, dist):
    """(training batches, the model's vocabulary): the dataset's train split, or random tokens on the device."""
    data_dir = cfg.data_dir or str(Path("data") / cfg.dataset)
    if cfg.real_data:
        try:
            meta = load_meta(data_dir)
            batches = TokenBatches(data_dir, "train", cfg.batch_size, cfg.block_size,
                                   grad_accum_steps=cfg.gradient_accumulation_steps, rank=dist.rank,
                                   world_size=dist.world_size, seed=cfg.seed, device=dist.device)
        except DataError as exc:
            raise DataError(f"{exc}; or benchmark on random tokens with --real_data=False") from None
        if cfg.vocab_size:
            raise ConfigError(f"vocab_size={cfg.vocab_size} applies to random tokens only: the dataset sets the "
                              "vocabulary; drop --vocab_size or add --real_data=False")
        return batches, model_vocab_size(meta)
    vocab_size = cfg.vocab_size
    if not vocab_size:
        prepared = (Path(data_dir) / "meta.json").is_file() or (Path(data_dir) / "meta.pkl").is_file()
        vocab_size = model_vocab_size(load_meta(data_dir)) if prepared else 50304
    return SyntheticBatches(vocab_size, cfg.batch_size, cfg.block_size, dist.device, cfg.seed + dist.rank), vocab_size


def set_adamw_impl(optimizer, impl: str) -> None:
    """Switch AdamW's kernel (before its first step): 'fused', 'foreach' or the 'for-loop' reference."""
    if impl == "auto":
        return
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ConfigError(f"adamw_impl={impl!r} applies to optimizer='adamw' only; drop --adamw_impl")
    for group in optimizer.param_groups:
        group["fused"] = impl == "fused"
        group["foreach"] = impl == "foreach"


def describe(cfg, model, model_type, dist, dtype, matmul_precision, vocab_size, tokens_per_iter, optimizer) -> str:
    group = optimizer.param_groups[0]
    kernel = ("fused" if group.get("fused") else "foreach" if group.get("foreach") else
              "torch's default: foreach on GPUs, for-loop on CPU" if group.get("foreach") is None else "for-loop")
    shape = (f"{cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads" if model_type == "gpt"
             else model_type)
    return (f"bench: {shape}, vocab {vocab_size}, {model.get_num_params() / 1e6:.2f}M parameters; "
            f"{tokens_per_iter:,} tokens per iteration per process "
            f"({cfg.gradient_accumulation_steps // dist.world_size} x {cfg.batch_size} x {cfg.block_size})\n"
            f"       {dist.world_size} process(es) on {dist.device} ({device_name(dist.device)}), "
            f"{str(dtype).removeprefix('torch.')} (matmul precision {matmul_precision}), compile={cfg.compile}, "
            f"{type(optimizer).__name__} "
            f"({kernel if isinstance(optimizer, torch.optim.AdamW) else cfg.optimizer}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}"
            + (f", freed memory {'retained' if cfg.retain_freed_memory else 'returned (glibc default)'}"
               if torch.device(dist.device).type == "cpu" else ""))


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} logical CPU cores" if torch.device(device).type == "cpu" else torch.device(device).type


def flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


# ------------------------------------------------------------------------ measuring


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CPU ops are synchronous already)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def time_steps(step, n: int, device: str):
    """([ms of each step], last loss): n steps back to back, no host sync between them."""
    if torch.device(device).type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            loss, _ = step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])], loss
    times = [time.perf_counter()]
    for _ in range(n):
        loss, _ = step()
        synchronize(device)
        times.append(time.perf_counter())
    return [1000 * (b - a) for a, b in zip(times, times[1:])], loss


def reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> str:
    """GPU: the allocator's peak during the timed steps; CPU: the process's peak resident set since it started."""
    if torch.device(device).type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved (torch.cuda, timed steps)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB
    return f"{rss_bytes / 2**20:.0f} MiB peak RSS (whole process, ru_maxrss)"


def marked_step(module, optimizer, scaler, batches, grad_accum, ctx, grad_clip, mark):
    """train.py's train_step with mark(phase) called as each phase begins, and mark(None) at the end."""
    loss_sum = 0.0
    for micro_step in range(grad_accum):
        mark("data")
        x, y = batches.next()
        with gradient_sync(module, enabled=(micro_step == grad_accum - 1)):
            mark("forward")
            with ctx:
                _, loss = module(x, y)
                loss = loss / grad_accum
            mark("backward")
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    mark("optimizer")
    grad_norm = optimizer_step(optimizer, scaler, grad_clip)
    mark(None)
    return loss_sum, grad_norm


def time_phases(module, optimizer, scaler, batches, grad_accum, ctx, grad_clip, n, device) -> dict:
    """Seconds spent in each phase over n steps, with a device sync at every phase boundary."""
    spent = dict.fromkeys(PHASES, 0.0)
    current = {"phase": None, "since": 0.0}

    def mark(phase):
        synchronize(device)
        now = time.perf_counter()
        if current["phase"] is not None:
            spent[current["phase"]] += now - current["since"]
        current.update(phase=phase, since=now)

    for _ in range(n):
        marked_step(module, optimizer, scaler, batches, grad_accum, ctx, grad_clip, mark)
    return spent


def write_profile(module, optimizer, scaler, batches, grad_accum, ctx, cfg, dist) -> Path:
    """Run profile_steps steps under torch.profiler, phases labelled; the chrome trace goes to a new file in out_dir."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if torch.device(dist.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    current = {"range": None}

    def mark(phase):  # close the phase that ends, open the one that begins
        if current["range"] is not None:
            current["range"].__exit__(None, None, None)
        current["range"] = record_function(phase) if phase else None
        if phase:
            current["range"].__enter__()

    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(cfg.profile_steps):
            marked_step(module, optimizer, scaler, batches, grad_accum, ctx, cfg.grad_clip, mark)
            prof.step()
        synchronize(dist.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-trace-{time.strftime('%Y%m%d-%H%M%S')}" + (f"-rank{dist.rank}" if dist.is_distributed else "")
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():  # never overwrite an earlier trace
        path, n = out_dir / f"{stem}-{n}.json", n + 1
    prof.export_chrome_trace(str(path))
    if dist.is_main:
        sort_by = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=12))
    return path


def entry(argv: list) -> None:
    """Measure what train.py runs: on a CPU one process per physical core, unless --threads (or OMP_NUM_THREADS)
    or --cpu_procs says otherwise (forge/cpulaunch.py)."""
    cfg = load_config(argv, BenchConfig)
    if cfg.threads:
        main(cfg)
    else:
        run_on_cpu_cores(main, cfg, __file__, argv)


if __name__ == "__main__":
    run_main(lambda: entry(sys.argv[1:]))
