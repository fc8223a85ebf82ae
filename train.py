"""Train a GPT on one CPU, one GPU, or many processes under torchrun.

    python train.py config/shakespeare_char.py --max_iters=2000
    torchrun --nproc_per_node=8 train.py config/owt.py

main(cfg) reads top to bottom in nanoGPT's order: config, distributed init, data, model, optimizer,
resume, parallelize (compile, DDP/FSDP), loop, cleanup. The machinery lives in forge/.
"""
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from configurator import ConfigError, TrainConfig, accumulation_per_rank, config_dict, load_config
from forge.checkpoint import (NANOGPT_MODEL_ARGS, CheckpointError, build_model, check_model_args,
                              check_training_fits, has_checkpoint, load_checkpoint, load_model_weights, model_args_of,
                              refuse_orphaned_checkpoints, restore_training_state, save_training_state)
from forge.cpu import retain_freed_memory
from forge.cpulaunch import run_on_cpu_cores
from forge.data import TokenBatches, load_meta
from forge.distributed import (all_reduce_mean, any_rank, destroy, gradient_sync, init_distributed, is_compiled,
                               parallelize, restart_count)
from forge.errors import UserError, is_rank_zero, run_main
from forge.flops import device_peak_flops
from forge.hellaswag import HellaSwagTask
from forge.hf import OPTIONS_GPT2_LACKS
from forge.io import lock_folder
from forge.lora import prepare_finetune, trainable_summary
from forge.metrics import MetricsLog
from forge.optim import build_optimizer
from forge.precision import autocast, resolve_dtype, set_matmul_precision
from forge.tokenize import GPT2_VOCAB_SIZE, check_same_tokenizer, gpt2_meta, tokenizer_identity
from model import GPT, GPTConfig

EVAL_SEED_OFFSET = 1_000_003  # evaluation batches: their own fixed stream, never the training batches


def main(cfg: TrainConfig) -> None:
    # -------------------------------------------------------------------- config and processes
    dist = init_distributed(cfg.device, backend=None if cfg.backend == "auto" else cfg.backend,
                            timeout_s=cfg.dist_timeout_s)
    log = MetricsLog(cfg.out_dir, enabled=dist.is_main)
    stop = StopRequest()
    loaders, lock = [], None
    try:
        # one writer per run folder while it lives (the kernel drops the lock if it dies): a second run is refused
        lock = lock_folder(cfg.out_dir, "training run") if dist.is_main and not cfg.eval_only else None
        grad_accum = accumulation_per_rank(cfg.gradient_accumulation_steps, dist.world_size)
        tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        dtype = resolve_dtype(cfg.dtype, dist.device)
        device_type = torch.device(dist.device).type
        seed_everything(cfg.seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
        set_matmul_precision(cfg.matmul_precision, dist.device)
        if device_type == "cpu":
            retain_freed_memory()  # each step re-allocates its activations: no page faults for them
        ctx = autocast(dist.device, dtype)
        log.info(f"{dist.world_size} process(es) on {dist.device}, {dtype}; {tokens_per_iter:,} tokens per iteration "
                 f"({cfg.gradient_accumulation_steps} x {cfg.batch_size} x {cfg.block_size})")

        init, ckpt = resolve_init(cfg.init_from, cfg.out_dir, cfg.eval_only)
        if ckpt is not None and ckpt.get("iter_num", 0) >= cfg.max_iters and not cfg.eval_only:
            log.info(f"{cfg.out_dir} already reached iter {ckpt['iter_num']} >= max_iters={cfg.max_iters}: nothing to do "
                     "(raise --max_iters to train further)")
            return

        # -------------------------------------------------------------------- data
        data_dir = cfg.data_dir or str(Path("data") / cfg.dataset)
        meta = load_meta(data_dir)
        train_batches = TokenBatches(data_dir, "train", cfg.batch_size, cfg.block_size,
                                     grad_accum_steps=cfg.gradient_accumulation_steps, rank=dist.rank,
                                     world_size=dist.world_size, seed=cfg.seed, device=dist.device)
        eval_batches = {split: TokenBatches(data_dir, split, cfg.batch_size, cfg.block_size,
                                            seed=cfg.seed + EVAL_SEED_OFFSET, device=dist.device)
                        for split in (("train", "val") if cfg.eval_train else ("val",))}
        loaders = [train_batches, *eval_batches.values()]
        if train_batches.examples is not None:
            log.info(f"{data_dir} train split: {train_batches.examples.describe()}")
        hellaswag = HellaSwagTask.load(meta, cfg.hellaswag_path, cfg.hellaswag_limit, dist.rank) \
            if cfg.eval_hellaswag_interval else None

        # -------------------------------------------------------------------- model
        model, model_args, model_type = create_model(cfg, init, ckpt, model_vocab_size(meta), meta, dist.device)
        lora = prepare_finetune(model, cfg, ckpt, Path(cfg.out_dir) / "ckpt.pt")  # finetune=lora: the adapters' spec
        model.to(dist.device)
        seed_everything(cfg.seed + dist.rank)  # from here on (dropout) every rank draws its own stream
        scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
        module, optimizer = parallelize_and_build_optimizer(cfg, model, dist, dtype)
        iter_num, best_val_loss, wandb_run_id = 0, math.inf, None
        if ckpt is not None:
            not_restored = restore_training_state(ckpt, model=model, optimizer=optimizer, scaler=scaler,
                                                  loader=train_batches, rank=dist.rank, world_size=dist.world_size)
            iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt.get("best_val_loss", math.inf))
            wandb_run_id = ckpt.get("wandb_run_id")
            log.info(f"resuming from {cfg.out_dir} at iter {iter_num}" + (f" ({not_restored})" if not_restored else ""))
            ckpt = None  # free the memory
        log.info(f"{model_type} model, {model.get_num_params():,} parameters" +
                 (f"; LoRA: {trainable_summary(model)}" if lora else ""))

        # -------------------------------------------------------------------- logging
        if not cfg.eval_only:  # eval_only writes nothing
            log.write_config(config_dict(cfg))
            log.start(iter_num)
            if cfg.wandb_log:
                wandb_run_id = log.start_wandb(cfg.wandb_project, cfg.wandb_run_name, config_dict(cfg), wandb_run_id)
        peak_flops = cfg.peak_flops or device_peak_flops(dist.device, dtype)
        bad_step = torch.full((), -1, dtype=torch.long, device=dist.device)  # first non-finite step, -1: none

        def save(reason: str) -> None:
            raise_if_nonfinite(bad_step, cfg.out_dir)  # a diverged model never replaces a good checkpoint
            path = save_training_state(
                cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, loader=train_batches,
                keep_last=cfg.keep_last, write=dist.is_main, model_args=model_args, model_type=model_type,
                tokenizer=tokenizer_identity(meta), iter_num=iter_num, best_val_loss=best_val_loss,
                config=config_dict(cfg), wandb_run_id=wandb_run_id, **({"lora": lora} if lora else {}))
            log.info(f"saved checkpoint to {path} ({reason})")

        # -------------------------------------------------------------------- the loop
        start_iter = iter_num
        compiling = is_compiled(model)  # the first evaluation and training step compile: not timed
        if compiling:
            log.info("compiling... (torch.compile: the first evaluation and training step take longer, minutes on a "
                     "CPU; ms/iter and MFU count from the step after)")
        compile_start = timer_start = time.time()
        timer_steps = 0
        while True:
            lr = get_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) \
                if cfg.decay_lr else cfg.learning_rate
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            scheduled = iter_num % cfg.eval_interval == 0 and (iter_num > start_iter or cfg.eval_at_start)
            if scheduled or iter_num == cfg.max_iters or cfg.eval_only:
                losses = evaluate(module, eval_batches, cfg.eval_iters, ctx, dist.rank, dist.world_size)
                scores = hellaswag.scores(model, dist.device, dist.rank, dist.world_size, ctx) \
                    if hellaswag and (iter_num % cfg.eval_hellaswag_interval == 0 or cfg.eval_only) else {}
                log.log_eval(iter_num, losses.get("train"), losses["val"], lr, scores)
                if cfg.eval_only:
                    break
                if iter_num > start_iter and (losses["val"] < best_val_loss or cfg.always_save_checkpoint):
                    best_val_loss = min(best_val_loss, losses["val"])
                    save(f"val loss {losses['val']:.4f}")
                timer_start, timer_steps = time.time(), 0
            if iter_num >= cfg.max_iters:
                break

            loss, grad_norm = train_step(module, optimizer, scaler, train_batches, grad_accum, ctx, cfg.grad_clip)
            finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | scaler.is_enabled())  # fp16: scaler skips inf grads
            bad_step = torch.where((bad_step < 0) & ~finite, iter_num, bad_step)
            timer_steps += 1

            if iter_num % cfg.log_interval == 0 or compiling:  # the only host-device syncs of training
                loss_mean, grad_norm_mean, bad, bad_at = all_reduce_mean(
                    torch.stack([loss.float(), grad_norm.float(), (bad_step >= 0).float(),
                                 (bad_step >= 0) * bad_step.float()])).tolist()
                if bad:
                    raise_nonfinite(round(bad_at / bad), cfg.out_dir)
                dt = (time.time() - timer_start) / timer_steps
                if iter_num % cfg.log_interval == 0:
                    mfu = model.estimate_mfu(tokens_per_iter / dist.world_size, dt, peak_flops) if peak_flops else None
                    timing = (None, None, None) if compiling else (dt * 1000, tokens_per_iter / dt, mfu)
                    log.log_step(iter_num, loss_mean, lr, grad_norm_mean, *timing)
                if compiling:  # this step compiled: the clock starts now
                    log.info(f"compiled in {time.time() - compile_start:.1f} s")
                timer_start, timer_steps, compiling = time.time(), 0, False
            iter_num += 1

            if any_rank(stop.requested):  # preemption or Ctrl-C: finish this step, save, exit 0
                save(f"stopped by {stop.signal_name or 'a signal on another rank'}")
                log.info(f"stopped at iter {iter_num}; continue with --init_from=resume (or auto)")
                break
    finally:
        for loader in loaders:
            loader.close()
        log.close()
        stop.restore()
        destroy()
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------ the pieces of main


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resolve_init(init_from: str, out_dir: str, eval_only: bool = False):
    """('scratch' | 'resume' | pretrained name or dir, checkpoint dict or None); never plans to overwrite a run."""
    exists = has_checkpoint(out_dir)
    if not eval_only:
        refuse_orphaned_checkpoints(out_dir, init_from)
    if init_from == "auto" or (exists and restart_count() > 0):  # torchrun or SLURM restarted us: continue the run
        init_from = "resume" if exists else "scratch"
    if init_from == "resume":
        if not exists:
            raise CheckpointError(f"init_from=resume but {Path(out_dir) / 'ckpt.pt'} does not exist: use "
                                  "--init_from=scratch (or auto) to start a run, or point --out_dir at an existing one")
        return "resume", load_checkpoint(out_dir)
    if init_from != "scratch" and not (init_from.startswith("gpt2") or Path(init_from).is_dir()):
        raise ConfigError(f"init_from={init_from!r} is not scratch, resume, auto, a GPT-2 name (gpt2, gpt2-medium, "
                          "gpt2-large, gpt2-xl), a local Hugging Face GPT-2 directory or a run's out_dir")
    if exists and not eval_only:
        raise CheckpointError(f"{Path(out_dir) / 'ckpt.pt'} already exists and init_from={init_from} would overwrite "
                              "it: continue it with --init_from=resume (or auto), or choose another --out_dir")
    return init_from, None


# what this command and this machine say, never the stored run's (a run may resume on another machine)
NOT_INHERITED = ("out_dir", "init_from", "device", "backend")


def resumed_run_config(values: dict) -> dict:
    """load_config's base: when the command resumes a run, the run's own config under what the command sets.

    So `--out_dir=X --init_from=resume` (plus e.g. --max_iters) continues a run, nanoGPT's included, with
    its dataset, shape and schedule; a shape the command sets that conflicts stays an error
    (check_checkpoint_matches). Model fields the stored config lacks come from the weights (a nanoGPT
    run's has no mlp: it is the erf GELU); keys of the stored config this version does not know are ignored.
    """
    defaults = TrainConfig.__dataclass_fields__
    out_dir, init_from = (values.get(k, defaults[k].default) for k in ("out_dir", "init_from"))
    if not has_checkpoint(out_dir) or (init_from not in ("resume", "auto") and restart_count() == 0):
        return {}
    ckpt = load_checkpoint(out_dir)
    check_model_args(ckpt, Path(out_dir) / "ckpt.pt")
    stored = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model_fields = {k: v for k, v in model_args_of(ckpt).items() if k != "vocab_size"}
    merged = {**model_fields, **stored, "model_type": ckpt["model_type"]}
    return {k: v for k, v in merged.items() if k in defaults and k not in NOT_INHERITED}


def model_vocab_size(meta: dict) -> int:
    """The model's vocabulary (rows of the embedding and the head) for a dataset: the one place padding is decided.

    A scratch BPE run rounds the tokenizer's vocabulary up to a multiple of 64 (50,257 -> 50,304: faster
    matmuls); character vocabularies stay exact, and a GPT-2 checkpoint keeps its own 50,257 rows. The
    tokenizer's real vocabulary (meta["vocab_size"], recorded in every checkpoint) bounds everything else:
    data ids are checked against it (forge.data) and sampling never draws a padded id (model.stream).
    """
    vocab_size = meta["vocab_size"]
    return vocab_size if meta["tokenizer"] == "char" else -(-vocab_size // 64) * 64


def create_model(cfg: TrainConfig, init: str, ckpt, vocab_size: int, meta: dict | None = None, device=None):
    """(raw model, model_args, model_type): built from the config, rebuilt from a checkpoint, or GPT-2 weights.

    vocab_size: a scratch model's rows (model_vocab_size); meta: the dataset's tokenizer, which a checkpoint
    or GPT-2 must match (None: no dataset to check, e.g. bench.py's random tokens). Sizes that cannot fit
    `device`'s memory (None: not checked) are refused before anything is built.
    """
    if init == "resume":
        check_model_args(ckpt, Path(cfg.out_dir) / "ckpt.pt")  # before anything is allocated from it
        check_checkpoint_matches(cfg, ckpt, meta)
        return model_from_checkpoint(ckpt, cfg, Path(cfg.out_dir) / "ckpt.pt", device)
    if init == "scratch":
        names = {f.name for f in dataclasses.fields(GPTConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
        model_args = {name: getattr(cfg, name) for name in sorted(names)} | {"vocab_size": vocab_size}
        check_training_fits(model_args, cfg.batch_size, device)  # absurd sizes: one line, not an OOM
        return build_model(cfg.model_type, model_args), model_args, cfg.model_type
    if has_checkpoint(init):  # another run of ours: its weights and architecture, a fresh optimizer and schedule
        source, ckpt = Path(init) / "ckpt.pt", load_checkpoint(init)
        check_model_args(ckpt, source)
        if meta is not None:
            check_same_tokenizer(ckpt.get("tokenizer"), meta, cfg.data_dir or f"data/{cfg.dataset}", source,
                                 "fine-tune it on data prepared with the tokenizer it was trained with")
        model, _, model_type = model_from_checkpoint(ckpt, cfg, source, device)
        return fit_pretrained(cfg, init, model, meta), dataclasses.asdict(model.config), model_type
    if cfg.model_type != "gpt":
        raise ConfigError(f"init_from={init} loads a GPT-2; model_type={cfg.model_type!r} cannot be fine-tuned from it")
    # GPT-2's weights fix the architecture: an option set otherwise would be ignored. Those GPT-2 cannot
    # express are refused before any download; another option set away from its default (the GELU kind,
    # untied_head) must match the weights' (left at its default, the weights decide)
    lacks = [f"{name}={getattr(cfg, name)!r}" for name, used in OPTIONS_GPT2_LACKS.items() if used(cfg)]
    refuse_pretrained_options(lacks, init, "GPT-2 has no such option")
    model = GPT.from_pretrained(init, {"dropout": cfg.dropout})
    differ = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in NANOGPT_MODEL_ARGS
              and getattr(cfg, f.name, f.default) not in (f.default, getattr(model.config, f.name))]
    refuse_pretrained_options([f"{name}={getattr(cfg, name)!r}" for name in differ], init, "its weights have "
                              + ", ".join(f"{name}={getattr(model.config, name)!r}" for name in differ))
    if meta is not None and model.config.vocab_size == GPT2_VOCAB_SIZE:  # GPT-2's BPE; another HF vocabulary: its own
        check_same_tokenizer(tokenizer_identity(gpt2_meta()), meta, cfg.data_dir or f"data/{cfg.dataset}", init,
                             "prepare the data with the GPT-2 tokenizer")
    return fit_pretrained(cfg, init, model, meta), dataclasses.asdict(model.config), "gpt"


def refuse_pretrained_options(options: list[str], init: str, why: str) -> None:
    if options:
        raise ConfigError(f"{', '.join(options)} cannot apply to {init}'s pretrained architecture ({why}): "
                          "drop it to fine-tune GPT-2, or train from scratch with it")


def model_from_checkpoint(ckpt: dict, cfg: TrainConfig, source: Path, device=None):
    """(model, model_args, model_type) rebuilt from a checkpoint's 'model' (for LoRA runs, the merged weights),
    with the config's dropout; a size that cannot fit `device` is refused before anything is built."""
    model_args, model_type = model_args_of(ckpt), ckpt["model_type"]
    model_args["dropout"] = cfg.dropout  # not a shape: the config's value applies to the rest of the run
    check_training_fits(model_args, cfg.batch_size, device)
    model = build_model(model_type, model_args)
    load_model_weights(model, ckpt["model"], source)
    return model, model_args, model_type


def fit_pretrained(cfg: TrainConfig, init: str, model, meta: dict | None):
    """A pretrained model cropped to the config's block_size, checked against the dataset's vocabulary."""
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is larger than {init}'s {model.config.block_size}; "
                          f"use --block_size={model.config.block_size} or less")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    if meta is not None and meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"the dataset's vocabulary ({meta['vocab_size']} ids) is larger than {init}'s "
                          f"({model.config.vocab_size}): prepare the data with the GPT-2 tokenizer")
    return model


def parallelize_and_build_optimizer(cfg: TrainConfig, model, dist, dtype):
    """(the module the loop calls, the optimizer): compile and DDP/FSDP applied, then the optimizer
    (after: FSDP2 swaps parameters for DTensors). bench.py builds its step the same way."""
    module = parallelize(model, dist, parallelism=cfg.parallelism, compile=cfg.compile,
                         activation_checkpointing=cfg.activation_checkpointing, param_dtype=dtype)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.weight_decay, cfg.learning_rate,
                                (cfg.beta1, cfg.beta2), torch.device(dist.device).type, muon_lr=cfg.muon_lr,
                                muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay,
                                muon_ns_steps=cfg.muon_ns_steps, embedding_lr=cfg.embedding_lr,
                                head_lr=cfg.head_lr)
    return module, optimizer


def check_checkpoint_matches(cfg: TrainConfig, ckpt: dict, meta: dict | None) -> None:
    """A resumed run must have the model settings and tokenizer its checkpoint was trained with (dropout may change)."""
    saved_config, saved_args = ckpt.get("config") or {}, model_args_of(ckpt)
    for name in ["model_type", *saved_args]:
        if name in ("dropout", "vocab_size") or not hasattr(cfg, name):
            continue
        saved = saved_config.get(name, saved_args.get(name, ckpt.get(name)))
        if saved is not None and saved != getattr(cfg, name):
            raise CheckpointError(f"{Path(cfg.out_dir) / 'ckpt.pt'} was trained with {name}={saved!r} but the config "
                                  f"says {name}={getattr(cfg, name)!r}: use the same model settings to resume, "
                                  "or another --out_dir for a new run")
    if meta is None:
        return
    check_same_tokenizer(ckpt.get("tokenizer"), meta, cfg.data_dir or f"data/{cfg.dataset}",
                         Path(cfg.out_dir) / "ckpt.pt", "resume on the dataset it was trained on (--dataset or --data_dir)")
    if meta["vocab_size"] > saved_args.get("vocab_size", meta["vocab_size"]):
        raise CheckpointError(f"the dataset's vocabulary ({meta['vocab_size']}) is larger than the checkpoint's "
                              f"({saved_args['vocab_size']}): resume on the dataset it was trained on")


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """Linear warmup (never 0, even at step 0), then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def train_step(module, optimizer, scaler, batches, grad_accum: int, ctx, grad_clip: float):
    """One optimizer step over grad_accum micro-batches: (mean loss, gradient norm before clipping), on device."""
    loss_sum = 0.0
    for micro_step in range(grad_accum):
        x, y = batches.next()
        with gradient_sync(module, enabled=(micro_step == grad_accum - 1)):  # all-reduce on the last only
            with ctx:
                _, loss = module(x, y, return_logits=False)  # the loss without materialising the logits
                loss = loss / grad_accum  # the gradients sum over micro-steps: scale to their mean
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum, optimizer_step(optimizer, scaler, grad_clip)


def optimizer_step(optimizer, scaler, grad_clip: float) -> torch.Tensor:
    """Unscale, clip, step, zero the gradients; returns the gradient norm before clipping, on device."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return full_tensor(grad_norm)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's sharded gradient norm); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def evaluate(module, eval_batches: dict, eval_iters: int, ctx, rank: int, world_size: int) -> dict:
    """Mean loss over the same eval_iters batches of each split every time, split across ranks.

    Rank r takes batches r, r + W, ...; every rank runs the same number of forwards (padding with
    weight 0) so collective forwards (FSDP) stay in step, then sums and counts are all-reduced.
    """
    module.eval()
    losses = {}
    for split, batches in eval_batches.items():
        total = torch.zeros(2, device=batches.device)  # [sum of losses, number of batches]
        for k in range(rank, -(-eval_iters // world_size) * world_size, world_size):
            x, y = batches.get_batch(k % eval_iters, 0)
            with ctx:
                _, loss = module(x, y, return_logits=False)
            weight = float(k < eval_iters)
            total += torch.stack([loss.float() * weight, torch.tensor(weight, device=total.device)])
        total = all_reduce_mean(total)
        losses[split] = (total[0] / total[1]).item()
    module.train()
    return losses


def raise_if_nonfinite(bad_step: torch.Tensor, out_dir: str) -> None:
    bad, bad_at = all_reduce_mean(torch.stack([(bad_step >= 0).float(), (bad_step >= 0) * bad_step.float()])).tolist()
    if bad:
        raise_nonfinite(round(bad_at / bad), out_dir)


def raise_nonfinite(step: int, out_dir: str) -> None:
    raise UserError(f"the loss or gradient norm became NaN/inf at iter {step}; stopped without saving, so the "
                             f"last good checkpoint in {out_dir} is untouched: lower learning_rate, set grad_clip, "
                             "or use bfloat16/float32")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0. A second Ctrl-C aborts."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if is_rank_zero():
            print(f"{self.signal_name} received: finishing this step, then saving a checkpoint", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


if __name__ == "__main__":  # on a CPU: one process per physical core (forge/cpulaunch.py)
    run_main(lambda: run_on_cpu_cores(main, load_config(sys.argv[1:], base=resumed_run_config), __file__, sys.argv[1:]))
