"""Checkpoints: `out_dir/ckpt.pt`, written atomically, read without running code.

A checkpoint is a dict with nanoGPT's classic keys (model, optimizer, model_args, iter_num,
best_val_loss, config) plus what an exact resume needs: model_type, model_options (the GPTConfig
fields nanoGPT lacks), tokenizer (what the ids mean), scaler, rng (per rank: torch, CUDA, numpy and
python generator states), data (the loader position) and wandb_run_id. Everything
is tensors and plain Python values, so `torch.load(weights_only=True)` reads it: a checkpoint can
never run code when it is opened.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over ckpt.pt (and the
folder fsync'ed): a crash at any moment leaves the old checkpoint or the new one, never a torn one.
"""
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from forge.errors import UserError
from forge.io import atomic_write, first_line, os_reason

CKPT_NAME = "ckpt.pt"
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # its GPTConfig
GPT2_MLPS = ("gelu", "gelu_exact")  # GPT-2's tanh GELU and nanoGPT's erf GELU: nanoGPT's model runs either's weights
PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP in older nanoGPT checkpoints
# Causal-mask buffers that nanoGPT saved before torch 2.0 had flash attention: not weights, dropped on load.
LEGACY_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")  # the copies keep_last writes: ckpt-<iter>.pt
KEPT_LIST = ".keep_last.json"  # the numbered copies keep_last wrote in this folder: the only ones it deletes


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, foreign or does not fit the configured model."""


# ----------------------------------------------------------------------------- saving

def checkpoint_path(out_dir_or_path) -> Path:
    """out_dir/ckpt.pt for a run folder, the path itself for a checkpoint file (*.pt, e.g. ckpt-2000.pt)."""
    path = Path(out_dir_or_path)
    return path if path.suffix == ".pt" and not path.is_dir() else path / CKPT_NAME


def has_checkpoint(out_dir) -> bool:
    return (Path(out_dir) / CKPT_NAME).is_file()


def refuse_orphaned_checkpoints(out_dir, init_from: str) -> None:
    """A run folder whose ckpt.pt is gone but whose numbered checkpoints remain is not started over (its
    keep_last would delete them): CheckpointError saying how to resume from the latest."""
    numbered = [] if has_checkpoint(out_dir) else numbered_checkpoints(out_dir)
    if numbered:
        ckpt = Path(out_dir) / CKPT_NAME
        raise CheckpointError(f"{out_dir} has no {CKPT_NAME} but holds numbered checkpoints "
                              f"(latest {numbered[-1].name}): "
                              f"init_from={init_from} would not continue them; resume from one with "
                              f"`cp {numbered[-1]} {ckpt}` and --init_from=resume, or choose another --out_dir")


def save_checkpoint(out_dir, state: dict, keep_last: int = 0) -> Path:
    """Write `state` to out_dir/ckpt.pt atomically; with keep_last=N also keep ckpt-<iter>.pt, the N newest."""
    out_dir = Path(out_dir)
    path = out_dir / CKPT_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
        if keep_last > 0:
            _keep_numbered_copy(out_dir, path, int(state.get("iter_num", 0)), keep_last)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write (e.g. a full disk) as a RuntimeError raised while handling the OSError
        os_error = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(os_error, OSError):
            raise
        reason = os_reason(os_error)
        previous = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot save the checkpoint in {out_dir}: {reason}; {previous}. "
                              "Free disk space or choose a writable out_dir") from None
    return path


def _keep_numbered_copy(out_dir: Path, path: Path, iter_num: int, keep_last: int) -> None:
    """ckpt-<iter>.pt beside ckpt.pt, then the oldest copies beyond keep_last removed: only copies listed in
    the folder's KEPT_LIST, which names every copy before it is made, so a kill at any moment leaves no
    copy unlisted, and a user's own files (ckpt-best.pt, or a ckpt-<n>.pt it did not write) stay."""
    numbered = out_dir / f"ckpt-{iter_num}.pt"
    ours = _kept_copies(out_dir)
    if numbered.exists() and numbered.name not in ours:
        print(f"warning: {numbered} was not written by keep_last: left as it is, no numbered copy of this "
              "checkpoint", file=sys.stderr, flush=True)
    else:
        ours = sorted({*ours, numbered.name}, key=_numbered_iter)
        _write_kept_copies(out_dir, ours)
        numbered.unlink(missing_ok=True)
        try:
            os.link(path, numbered)  # same bytes, no copy: a later ckpt.pt replaces the name, not this file
        except OSError:
            with open(path, "rb") as src:
                atomic_write(numbered, lambda f: shutil.copyfileobj(src, f, 1 << 24))
    for old in ours[:-keep_last]:
        (out_dir / old).unlink(missing_ok=True)
    _write_kept_copies(out_dir, ours[-keep_last:])


def _numbered_iter(name: str) -> int:
    return int(NUMBERED.fullmatch(name).group(1))


def _kept_copies(out_dir: Path) -> list:
    """The ckpt-<iter>.pt names keep_last wrote in out_dir, oldest first ([] before its first copy)."""
    try:
        names = json.loads((out_dir / KEPT_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = [n for n in names if isinstance(n, str) and NUMBERED.fullmatch(n)] if isinstance(names, list) else []
    return sorted(set(names), key=_numbered_iter)


def _write_kept_copies(out_dir: Path, names: list) -> None:
    atomic_write(out_dir / KEPT_LIST, lambda f: f.write(json.dumps(names).encode("utf-8")))


def numbered_checkpoints(out_dir) -> list:
    """The ckpt-<iter>.pt files in out_dir, oldest first (only exactly that name: ckpt-best.pt is not one)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt-*.pt") if (m := NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------- loading

def _recovery_hint(path: Path) -> str:
    """What to do about an unreadable checkpoint: restore a copy, never delete (it may be recoverable)."""
    numbered = [p for p in numbered_checkpoints(path.parent) if p.resolve() != path.resolve()]
    if numbered:
        return (f"move it aside rather than deleting it, then resume from the run's latest numbered checkpoint: "
                f"cp {numbered[-1]} {path.parent / CKPT_NAME}")
    return "keep it (do not delete it) and restore a good copy from a backup or from the machine that wrote it"


def strip_prefixes(state_dict: dict) -> dict:
    """Parameter names without `_orig_mod.` / `module.` prefixes, and without the causal-mask buffers
    (`attn.bias`) of pre-flash-attention nanoGPT checkpoints: old checkpoints load as they are."""
    clean = {}
    for key, value in state_dict.items():
        if LEGACY_BUFFERS.search(key):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        clean[key] = value
    return clean


def load_checkpoint(out_dir_or_path) -> dict:
    """The checkpoint at out_dir/ckpt.pt (or a file path), on the CPU, read with weights_only=True.

    CheckpointError for a missing, empty, truncated, corrupt or foreign file, and for a pickle that
    would need to run code to load.
    """
    path = checkpoint_path(out_dir_or_path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one first (init_from=scratch) or check out_dir")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted copy?); {_recovery_hint(path)}")
    # Memory-map the tensors instead of reading them in: each of a node's ranks would otherwise hold its own
    # copy of the whole checkpoint (8 x ~19 GB for GPT-2 1.5B with AdamW); mapped, they share the page cache.
    # Only for the zip format (torch >= 1.6) and on POSIX (Windows cannot replace a mapped file on save).
    mmap = os.name == "posix" and zipfile.is_zipfile(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if code:  # weights_only refused a reference to a class or function: loading it would run code
            raise CheckpointError(f"refusing to load {path}: it holds a pickled {code.group(1)}, which would run code "
                                  "when loaded (checkpoints hold only tensors and plain values); it is not a gptforge "
                                  "checkpoint, or it comes from an untrusted source") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a valid checkpoint file); "
                              f"{_recovery_hint(path)}") from None
    except Exception as exc:  # zip errors, EOF, bad magic: truncated or not a checkpoint at all
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(exc)}); "
                              f"{_recovery_hint(path)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' state dict); "
                              "point to a ckpt.pt written by train.py")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    ckpt.setdefault("model_type", "gpt")
    return ckpt


def load_model_weights(model: torch.nn.Module, state_dict: dict, source) -> None:
    """load_state_dict, turning a shape or key mismatch into a CheckpointError that names the culprit."""
    _check_fits(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def _check_fits(own: dict, state_dict: dict, source) -> None:
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        details = (mismatched[:1] and [f"shape of {mismatched[0]}"]) or \
                  (missing[:1] and [f"missing {missing[0]}"]) or [f"unexpected {unexpected[0]}"]
        raise CheckpointError(f"checkpoint {source} does not fit the model ({details[0]}; {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(mismatched)} mismatched tensors): "
                              "use the model settings it was trained with")


def checkpoint_model_args(model_args: dict, model_type: str = "gpt") -> dict:
    """The checkpoint entries that describe the model: {'model_args': ..., 'model_options': ...}.

    model_args holds nanoGPT's seven keys, so nanoGPT's sample.py (`GPTConfig(**model_args)`) loads
    a model that uses only GPT-2's architecture; an option nanoGPT lacks (rotary, RMSNorm, ...) is
    kept in model_args too, so that nanoGPT refuses the checkpoint instead of running the weights
    as another model. model_options holds every GPTConfig field nanoGPT lacks, for our own loader.
    """
    if model_type != "gpt":
        return {"model_args": dict(model_args)}
    from model import GPTConfig

    defaults = GPTConfig.__dataclass_fields__
    options = {k: v for k, v in model_args.items() if k not in NANOGPT_MODEL_ARGS}
    foreign = {k: v for k, v in options.items()
               if not (k == "mlp" and v in GPT2_MLPS) and v != defaults[k].default}
    return {"model_args": {k: model_args[k] for k in NANOGPT_MODEL_ARGS} | foreign, "model_options": options}


def model_args_of(ckpt: dict) -> dict:
    """The full model arguments of a checkpoint: model_args with model_options on top. A checkpoint
    without model_options and without 'mlp' is nanoGPT's, whose MLP is the exact (erf) nn.GELU()."""
    model_args = dict(ckpt["model_args"])
    if isinstance(ckpt.get("model_options"), dict):
        model_args.update(ckpt["model_options"])
    elif ckpt.get("model_type", "gpt") == "gpt" and "mlp" not in model_args:
        model_args["mlp"] = "gelu_exact"
    return model_args


def build_model(model_type, model_args):
    """The model a training run or checkpoint names: 'gpt' (model.GPT) or 'bigram' (model.BigramLanguageModel).

    model_args is a dict of GPTConfig fields; the bigram uses only vocab_size and block_size.
    """
    from model import GPT, BigramLanguageModel, GPTConfig, ModelError

    model_args = dict(model_args)
    if model_type == "gpt":
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise ModelError(f"unknown GPT model argument(s) {', '.join(unknown)}: "
                             f"the GPTConfig fields are {', '.join(sorted(known))}")
        return GPT(GPTConfig(**model_args))
    if model_type == "bigram":
        if "vocab_size" not in model_args:
            raise ModelError("the bigram model needs vocab_size in its model arguments")
        return BigramLanguageModel(model_args["vocab_size"], model_args.get("block_size", 1024))
    raise ModelError(f"unknown model_type {model_type!r}: use 'gpt' or 'bigram'")


def load_model(out_dir, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) for sample.py and evaluate.py. The checkpoint's
    shapes are checked before anything is allocated, and NaN/inf weights are refused."""
    ckpt = load_checkpoint(out_dir)
    source = checkpoint_path(out_dir)
    check_model_args(ckpt, source)
    check_finite_weights(ckpt["model"], source)
    model = build_model(ckpt["model_type"], model_args_of(ckpt))
    load_model_weights(model, ckpt["model"], source)
    model.to(device)
    model.eval()
    return model, ckpt


def check_model_args(ckpt: dict, source) -> None:
    """The checkpoint has model_args, and the model they describe has exactly the shapes of its tensors.

    Checked on the meta device (no memory), after the number of blocks is compared with the tensors:
    an edited or damaged model_args (n_embd=10**6, n_layer=10**9) is a CheckpointError, never a model
    of terabytes being allocated."""
    model_args = ckpt.get("model_args")
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{source} has no model_args (the model's shape): it was not written by a training run "
                              "of this project or nanoGPT and cannot be rebuilt into a model")
    if ckpt.get("model_type", "gpt") == "gpt":
        blocks = {int(m.group(1)) for key in ckpt["model"] if (m := re.match(r"transformer\.h\.(\d+)\.", key))}
        if model_args.get("n_layer") != len(blocks):
            raise CheckpointError(f"{source}: model_args says n_layer={model_args.get('n_layer')!r} but its weights "
                                  f"hold {len(blocks)} blocks; the checkpoint is damaged: restore a good copy")
    with torch.device("meta"):
        skeleton = build_model(ckpt.get("model_type", "gpt"), model_args_of(ckpt))
    _check_fits(skeleton.state_dict(), ckpt["model"], source)


def check_finite_weights(state_dict: dict, source) -> None:
    """CheckpointError naming the first tensor holding NaN or inf (sampling from it gives garbage or fails)."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source} holds NaN/inf weights (first in {name}): the run diverged before it "
                                  "was saved; use an earlier checkpoint of it (ckpt-<iter>.pt) or retrain")


# ----------------------------------------------------------------------------- sizes

def device_memory_bytes(device) -> int | None:
    """Total memory of the device training runs on (RAM for the CPU), or None when unknown."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_training_fits(model_args: dict, batch_size: int, device) -> None:
    """A UserError, before anything is allocated, when the model
    (weights, gradients and AdamW's two states: 16 bytes a parameter) or one micro-batch's logits and
    activations cannot fit the device's whole memory, however the rest is arranged. Catches absurd
    sizes (a typo, an edited checkpoint), not tight ones."""
    memory = device_memory_bytes(device)
    if memory is None:
        return
    n_layer, n_embd = int(model_args.get("n_layer", 0)), int(model_args.get("n_embd", 0))
    vocab, block = int(model_args.get("vocab_size", 0)), int(model_args.get("block_size", 0))
    params = n_layer * 12 * n_embd ** 2 + (vocab + block) * n_embd
    gib = 1 << 30
    if params * 16 > memory:
        raise UserError(f"a model with n_layer={n_layer}, n_embd={n_embd}, vocab_size={vocab} has ~{params / 1e9:,.1f}B "
                        f"parameters and needs ~{params * 16 / gib:,.0f} GiB to train, more than the "
                        f"{memory / gib:,.0f} GiB of {device}: choose a smaller model")
    batch = batch_size * block * (vocab * 4 * 2 + n_layer * n_embd * 16)
    if batch > memory:
        raise UserError(f"batch_size={batch_size} x block_size={block} needs ~{batch / gib:,.0f} GiB for one "
                        f"micro-batch, more than the {memory / gib:,.0f} GiB of {device}: lower batch_size (raise "
                        "gradient_accumulation_steps to keep the tokens per step)")


# ----------------------------------------------------------------------------- random state

def rng_state() -> dict:
    """This process's torch, CUDA, numpy and python generator states as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> str | None:
    """Restore what rng_state() captured; returns what could not be restored (None: everything).

    CUDA states are per device index: those of the GPUs this process sees are restored (a job with
    fewer or more visible GPUs restores the indices both have), and the rest is named in the result.
    """
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    saved = state.get("cuda") or []
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)
    if len(saved) > visible:
        return (f"the CUDA random states of GPU(s) {', '.join(map(str, range(visible, len(saved))))} were saved but "
                f"this process sees {visible} GPU(s): dropout on them restarts its stream")
    if saved and len(saved) < visible:
        return f"no saved CUDA random state for GPU(s) {', '.join(map(str, range(len(saved), visible)))}"
    return None


def gather_rng_states() -> list:
    """Every rank's rng_state(), on rank 0 (in a process group every rank must call this); [own] alone."""
    import torch.distributed as tdist

    own = rng_state()
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [own]
    gathered = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(own, gathered, dst=0)
    return gathered or []


def restore_rng_states(states, rank: int, world_size: int) -> str | None:
    """Set this rank's saved generator states; returns what could not be restored (None: all of it).

    Nothing is set when the checkpoint has no states or was saved by another number of processes.
    """
    if not isinstance(states, list) or not states:
        return "the checkpoint has no saved random state: dropout streams restart"
    if len(states) != world_size:
        return f"random states were saved by {len(states)} process(es), not {world_size}: dropout streams restart"
    return set_rng_state(states[rank])


# ----------------------------------------------------------------------------- training state

def save_training_state(out_dir, *, model, optimizer, scaler, loader, keep_last: int = 0, write: bool = True,
                        **fields):
    """Gather the full model and optimizer state and every rank's RNG state; the writer (rank 0) saves.

    Collective under a process group: every rank must call it. `fields` are the plain entries
    (model_args, model_type, tokenizer, iter_num, best_val_loss, config, wandb_run_id); model_args
    is stored as checkpoint_model_args() splits it. A failed write fails every rank, not only the
    writer. Returns the checkpoint's path.
    """
    from forge.distributed import any_rank, full_model_state_dict, full_optimizer_state_dict
    from forge.lora import lora_checkpoint_entries

    state = {
        "model": full_model_state_dict(model),  # the raw model: no _orig_mod. / module. prefixes
        "optimizer": full_optimizer_state_dict(model, optimizer),
        "scaler": scaler.state_dict(),
        "data": loader.state_dict(),
        "rng": gather_rng_states(),
        **fields,
        **checkpoint_model_args(fields["model_args"], fields.get("model_type", "gpt")),
    }
    if fields.get("lora"):  # LoRA: 'model' gets the merged weights, 'lora' the frozen base and adapters
        state["model"], state["lora"] = lora_checkpoint_entries(state["model"], fields["lora"])
    error = None
    if write:
        try:
            save_checkpoint(out_dir, state, keep_last)
        except CheckpointError as exc:
            error = exc
    if any_rank(error is not None):
        raise error or CheckpointError(f"rank 0 could not save the checkpoint in {out_dir}; see its error")
    return Path(out_dir) / CKPT_NAME


def restore_training_state(ckpt: dict, *, model, optimizer, scaler, loader, rank: int, world_size: int) -> bool:
    """Load the optimizer, loss scaler, loader position and RNG state of a checkpoint (the model's
    weights are loaded before parallelize). Returns what of the random streams could not be restored
    (None: all, an exact resume), e.g. after a change of world size. Old nanoGPT checkpoints, with fewer
    entries, load too."""
    from forge.distributed import load_full_optimizer_state_dict

    if ckpt.get("optimizer"):
        try:
            load_full_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({first_line(exc)}); "
                                  "resume with the optimizer settings it was trained with") from None
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt.get("data") or {"step": int(ckpt.get("iter_num", 0)), "micro_step": 0})
    return restore_rng_states(ckpt.get("rng"), rank, world_size)
