"""Evaluate a trained run or GPT-2: loss and perplexity over a whole split, and HellaSwag.

    python evaluate.py --out_dir=out-shakespeare-char                       # its own dataset's val split
    python evaluate.py --init_from=gpt2 --dataset=openwebtext               # GPT-2 124M: about 3.12 (below)
    torchrun --nproc_per_node=8 evaluate.py --init_from=gpt2-xl --hellaswag=True
    python evaluate.py --init_from=gpt2 --loss=False --hellaswag=True --limit=500

Loss protocol (deterministic; the same number on any number of processes). The split's N tokens
are cut into consecutive, non-overlapping windows of block_size targets: window k feeds tokens
[kT, kT+T) and predicts tokens [kT+1, kT+T+1), so every token but the first is predicted exactly
once, with between 1 and T tokens of context (the context restarts at each window boundary; no
token is dropped and none is scored twice). The last window is shorter. The reported loss is the
mean cross-entropy over all N-1 predicted tokens (not a mean of window means), perplexity its
exp. Under torchrun, rank r takes batches r, r+W, ... and the loss sums and token counts are
summed over ranks. --limit_tokens=M scores only the first M predicted tokens (quick runs).

GPT-2 124M on OpenWebText (the classic reference, ~3.12; nanoGPT reports 3.11 from random batches
of the same length):
    python data/openwebtext/prepare.py
    torchrun --nproc_per_node=8 evaluate.py --init_from=gpt2 --dataset=openwebtext --batch_size=8
(config/eval_gpt2.py does the same through train.py's eval_only on random batches.)
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from configurator import ConfigError, check_types, load_config
from forge.data import SequentialWindows, load_meta, open_split
from forge.distributed import all_reduce_mean, destroy, init_distributed
from forge.errors import run_main
from forge.hellaswag import DEFAULT_CACHE_DIR, check_tokenizer, hellaswag_accuracy, load_hellaswag
from forge.inference import load_for_inference
from forge.precision import autocast, resolve_dtype, set_matmul_precision
from forge.tokenize import check_same_tokenizer, tokenizer_identity


@dataclass
class EvalConfig:
    out_dir: str = "out"  # training run to evaluate (its ckpt.pt), when init_from='resume'
    init_from: str = "resume"  # 'resume' (out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF GPT-2 folder
    meta: str = ""  # the run's meta.json (or its folder) when its data folder is not on this machine
    dataset: str = ""  # folder under data/ to score; '' = the run's own dataset (openwebtext for GPT-2)
    data_dir: str = ""  # explicit data folder; '' means data/<dataset>
    split: str = "val"  # which <split>.bin to score over, whole
    loss: bool = True  # loss and perplexity over the split
    block_size: int = 0  # tokens per window; 0 = the model's context length
    batch_size: int = 8  # windows (or HellaSwag examples) per forward pass, per process
    limit_tokens: int = 0  # score only the first this many tokens of the split (0 = all)
    hellaswag: bool = False  # HellaSwag accuracy (GPT-2 BPE models only)
    input: str = ""  # a local HellaSwag jsonl; '' = the official validation set, downloaded once into cache_dir
    cache_dir: str = str(DEFAULT_CACHE_DIR)  # where the downloaded HellaSwag file is kept
    limit: int = 0  # score only the first this many HellaSwag examples (0 = all 10,042)
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N', 'mps'
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # 'auto': bfloat16 if supported, else float16 on cuda, float32 elsewhere
    backend: str = "auto"  # process-group backend under torchrun: 'auto' (nccl on cuda, gloo otherwise), 'nccl', 'gloo'

    def __post_init__(self):
        check_types(self)
        for name in ("block_size", "limit_tokens", "limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative (0 = the default)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if not (self.loss or self.hellaswag):
            raise ConfigError("nothing to do: --loss=False and --hellaswag=False; enable one of them")


def eval_data_dir(cfg: EvalConfig, run_data_dir: Path | None) -> Path:
    """The folder to score: --data_dir, --dataset, the run's own, or OpenWebText for GPT-2."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.dataset:
        return Path("data") / cfg.dataset
    return run_data_dir if run_data_dir is not None else Path("data") / "openwebtext"


@torch.no_grad()
def split_loss(model, windows, ctx, world_size: int) -> tuple[float, int]:
    """(summed cross-entropy, number of predicted tokens) over this rank's windows, summed over all ranks."""
    device = windows.device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, token count]
    for x, y in windows:
        with ctx:
            _, loss = model(x, y, return_logits=False)  # mean over the targets that are not -1, head in chunks
        n = (y != -1).sum()
        # a padding batch (all -1) has a NaN mean: it counts zero tokens, and adds nothing
        total += torch.stack([torch.where(n > 0, loss.double() * n, 0.0), n.double()])
    total = all_reduce_mean(total) * world_size
    return total[0].item(), round(total[1].item())


def main(cfg: EvalConfig) -> None:
    dist = init_distributed(cfg.device, backend=None if cfg.backend == "auto" else cfg.backend)
    try:
        dtype = resolve_dtype(cfg.dtype, dist.device)
        set_matmul_precision("high", dist.device)  # TF32 on Ampere+ GPUs
        ctx = autocast(dist.device, dtype)
        say = print if dist.is_main else (lambda *a, **k: None)
        if cfg.loss and cfg.init_from != "resume":  # missing data fails before a GPT-2 download of up to 6 GB
            open_split(eval_data_dir(cfg, None), cfg.split)
        loaded = load_for_inference(cfg.out_dir, cfg.init_from, dist.device, cfg.meta)
        model = loaded.model
        say(f"evaluating {loaded.source} on {dist.world_size} process(es), {dist.device}, {str(dtype).removeprefix('torch.')}")
        if cfg.hellaswag:  # a char model or a bad file fails before the (long) loss pass
            check_tokenizer(loaded.meta["tokenizer"])
            examples = load_hellaswag(cfg.input or None, cfg.cache_dir, cfg.limit or None, rank=dist.rank)

        if cfg.loss:
            block_size = cfg.block_size or model.config.block_size
            if block_size > model.config.block_size:
                raise ConfigError(f"block_size={block_size} is longer than the model's context "
                                  f"({model.config.block_size}); use {model.config.block_size} or less")
            data_dir = eval_data_dir(cfg, loaded.data_dir)
            windows = SequentialWindows(data_dir, cfg.split, block_size, cfg.batch_size, rank=dist.rank,
                                        world_size=dist.world_size, device=dist.device, max_targets=cfg.limit_tokens)
            # token ids only mean something under the tokenizer the model was trained with (checked against its record)
            check_same_tokenizer(tokenizer_identity(loaded.meta), load_meta(data_dir), str(data_dir), loaded.source,
                                 "evaluate it on data prepared with its own tokenizer")
            t0 = time.time()
            loss_sum, n_tokens = split_loss(model, windows, ctx, dist.world_size)
            loss = loss_sum / n_tokens
            say(f"{data_dir / (cfg.split + '.bin')}: loss {loss:.4f}, perplexity {math.exp(loss):.2f} over "
                f"{n_tokens:,} tokens (windows of {block_size}; {time.time() - t0:.1f}s)")

        if cfg.hellaswag:
            t0 = time.time()
            acc, acc_norm = hellaswag_accuracy(model, examples, loaded.tokenizer, dist.device, dist.rank,
                                               dist.world_size, batch_size=cfg.batch_size, autocast=ctx)
            say(f"HellaSwag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over {len(examples):,} examples "
                f"({time.time() - t0:.1f}s)")
    finally:
        destroy()


if __name__ == "__main__":
    run_main(lambda: main(load_config(sys.argv[1:], EvalConfig, prog="evaluate.py")))
