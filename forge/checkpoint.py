"""Checkpoints: `out_dir/ckpt.pt`, written atomically, read without running code.

A checkpoint is a dict with nanoGPT's classic keys (model, optimizer, model_args, iter_num,
best_val_loss, config) plus what an exact resume needs: model_type, scaler, rng (per rank: torch,
CUDA, numpy and python generator states), data (the loader position) and wandb_run_id. Everything
is tensors and plain Python values, so `torch.load(weights_only=True)` reads it: a checkpoint can
never run code when it is opened.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over ckpt.pt (and the
folder fsync'ed): a crash at any moment leaves the old checkpoint or the new one, never a torn one.
"""
import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from forge.errors import UserError

CKPT_NAME = "ckpt.pt"
PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DDP in older nanoGPT checkpoints
# Causal-mask buffers that nanoGPT saved before torch 2.0 had flash attention: not weights, dropped on load.
LEGACY_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, foreign or does not fit the configured model."""


# ----------------------------------------------------------------------------- atomic files

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Create or replace `path` with what write(binary_file) writes: all of it or nothing.

    OSError (disk full, read-only or unwritable folder) propagates after the temporary file is
    removed, and the previous `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp.*"):  # left by a writer that was killed: reclaim the space
        try:
            stale.unlink()
        except OSError:
            pass
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def checkpoint_path(out_dir_or_path) -> Path:
    """out_dir/ckpt.pt for a run folder, the path itself for a checkpoint file (*.pt, e.g. ckpt-2000.pt)."""
    path = Path(out_dir_or_path)
    return path if path.suffix == ".pt" and not path.is_dir() else path / CKPT_NAME


def has_checkpoint(out_dir) -> bool:
    return (Path(out_dir) / CKPT_NAME).is_file()


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
        reason = os_error.strerror or str(os_error)
        previous = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot save the checkpoint in {out_dir}: {reason}; {previous}. "
                              "Free disk space or choose a writable out_dir") from None
    return path


def _keep_numbered_copy(out_dir: Path, path: Path, iter_num: int, keep_last: int) -> None:
    numbered = out_dir / f"ckpt-{iter_num}.pt"
    numbered.unlink(missing_ok=True)
    try:
        os.link(path, numbered)  # same bytes, no copy: a later ckpt.pt replaces the name, not this file
    except OSError:
        atomic_write(numbered, lambda f: f.write(path.read_bytes()))
    history = sorted(out_dir.glob("ckpt-*.pt"), key=lambda p: _numbered_iter(p))
    for old in history[:-keep_last]:
        old.unlink(missing_ok=True)


def _numbered_iter(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except ValueError:
        return -1


# ----------------------------------------------------------------------------- loading

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
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted copy?); delete it or restore a good copy")
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
                              "delete it or restore a good copy") from None
    except Exception as exc:  # zip errors, EOF, bad magic: truncated or not a checkpoint at all
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_first_line(exc)}); "
                              "delete it or restore a good copy") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' state dict); "
                              "point to a ckpt.pt written by train.py")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    ckpt.setdefault("model_type", "gpt")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_model_weights(model: torch.nn.Module, state_dict: dict, source) -> None:
    """load_state_dict, turning a shape or key mismatch into a CheckpointError that names the culprit."""
    own = model.state_dict()
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
    model.load_state_dict(state_dict)


def load_model(out_dir, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) for sample.py and evaluate.py."""
    from model import build_model

    ckpt = load_checkpoint(out_dir)
    model_args = ckpt.get("model_args")
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{checkpoint_path(out_dir)} has no model_args; it cannot be rebuilt into a model")
    model = build_model(ckpt["model_type"], dict(model_args))
    load_model_weights(model, ckpt["model"], checkpoint_path(out_dir))
    model.to(device)
    model.eval()
    return model, ckpt


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


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured (CUDA states only where this process has the same GPUs)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def gather_rng_states() -> list:
    """Every rank's rng_state(), on rank 0 (in a process group every rank must call this); [own] alone."""
    import torch.distributed as tdist

    own = rng_state()
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [own]
    gathered = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(own, gathered, dst=0)
    return gathered or []


def restore_rng_states(states, rank: int, world_size: int) -> bool:
    """Set this rank's saved generator states; False (nothing set) when the world size changed."""
    if not isinstance(states, list) or len(states) != world_size:
        return False
    set_rng_state(states[rank])
    return True


# ----------------------------------------------------------------------------- training state

def save_training_state(out_dir, *, model, optimizer, scaler, loader, keep_last: int = 0, write: bool = True,
                        **fields):
    """Gather the full model and optimizer state and every rank's RNG state; the writer (rank 0) saves.

    Collective under a process group: every rank must call it. `fields` are the plain entries
    (model_args, model_type, iter_num, best_val_loss, config, wandb_run_id). A failed write fails
    every rank, not only the writer. Returns the checkpoint's path.
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
    weights are loaded before parallelize). Returns whether the random streams were restored exactly
    (False when the world size changed). Old nanoGPT checkpoints, with fewer entries, load too."""
    from forge.distributed import load_full_optimizer_state_dict

    if ckpt.get("optimizer"):
        try:
            load_full_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({_first_line(exc)}); "
                                  "resume with the optimizer settings it was trained with") from None
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt.get("data") or {"step": int(ckpt.get("iter_num", 0)), "micro_step": 0})
    return restore_rng_states(ckpt.get("rng"), rank, world_size)
