"""Everything distributed, so that train.py reads the same for one process and for 64.

    dist = init_distributed(device, backend, timeout_s)      # torchrun's env, or one process
    model = GPT(...)                                          # the RAW model: checkpoint from it
    module = parallelize(model, dist, parallelism='ddp')      # what the loop calls
    optimizer = ...                                           # after parallelize (FSDP2 swaps params)
    with gradient_sync(module, enabled=last_micro_step):      # all-reduce on the last micro-step only
        loss = module(x, y)[1]; loss.backward()
    full_model_state_dict(model)                              # same checkpoint format for every setup

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE); without them this is one
process and no process group exists: every function here then works on the plain module.
Parallelism is applied to a model in small standalone functions (torchtitan's apply_* style):
- DDP replicates the model and all-reduces gradients (fits when params + grads + Adam fit a GPU).
- FSDP2 (`fully_shard`, one unit per transformer block, then the root) shards parameters,
  gradients and optimizer state across ranks.
Checkpoints are always full, unsharded state dicts keyed by parameter name (no `module.` /
`_orig_mod.` prefixes), gathered on rank 0 on the CPU, so a checkpoint written by 8 FSDP ranks
loads into 2 DDP ranks, into one process and into sample.py.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import sys
import types
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from forge.errors import UserError, is_rank_zero, register_error_translator
from forge.io import first_line

DEFAULT_TIMEOUT_S = 900.0  # long enough for rank 0 to write a GPT-2 XL checkpoint while the others wait
PARALLELISMS = ("ddp", "fsdp")


class CollectiveError(UserError):
    """A collective timed out (exit code 3) or lost its peer (exit code 4): another rank hung or died.

    A timeout is reported by every rank that sees it (rank 0 may be the one that hung); a peer that
    died is named by the launcher (forge/launch.py), so a lost connection is reported like any user
    error (rank 0 only).
    """

    def __init__(self, message: str, timed_out: bool):
        super().__init__(message)
        self.exit_code = 3 if timed_out else 4
        self.report_on_every_rank = timed_out


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank, 0 .. world_size-1
    local_rank: int = 0  # rank on this node: which GPU this process drives
    world_size: int = 1  # number of processes in the job
    device: str = "cpu"  # resolved device string, e.g. 'cuda:3' under torchrun, 'cpu', 'mps'

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# The job-wide state of this process, set by init_distributed().
_timeout_s: float = DEFAULT_TIMEOUT_S
_cpu_group = None  # gloo group for any_rank() when the default group is NCCL; None: use the default group
_joined_rank: int | None = None  # this process's rank once it joined a multi-process job (kept after destroy())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; unset it or launch with torchrun")


def resolve_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu; other strings are checked against what this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but this machine has no usable CUDA GPU; use --device=cpu (or auto)")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UserError(f"device={device!r} but this machine shows {torch.cuda.device_count()} CUDA GPU(s) "
                               f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); use --device=cuda or check "
                               "CUDA_VISIBLE_DEVICES")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError(f"device={device!r} but MPS is not available here; use --device=cpu (or auto)")
    return device


def check_processes(device: str, backend: str | None, world_size: int, local_world_size: int) -> str:
    """The process-group backend for `world_size` processes on `device` (a resolved device), `local_world_size`
    of them on this node: `backend`, or by default 'nccl' on CUDA and 'gloo' otherwise. A UserError for
    a setup that cannot work. forge.launch runs it before starting any worker, each worker again."""
    kind = torch.device(device).type
    backend = backend or ("nccl" if kind == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise UserError(f"backend={backend!r} is not supported; use 'nccl' (GPUs) or 'gloo' (CPU)")
    if backend == "nccl" and kind != "cuda":
        raise UserError(
            f"backend='nccl' needs CUDA GPUs but device={device!r}"
            + ("" if torch.cuda.is_available() else " and this machine has none")
            + "; use --backend=gloo (CPU) or --device=cuda"
        )
    if kind == "mps" and world_size > 1:
        raise UserError("MPS does not support multi-process training; use --device=cpu or one process")
    if kind == "cuda" and local_world_size > torch.cuda.device_count():
        n_gpus = torch.cuda.device_count()
        raise UserError(
            f"{local_world_size} processes on this node but only {n_gpus} GPU(s) visible; "
            f"launch with --nproc_per_node={n_gpus} (or fewer), or check CUDA_VISIBLE_DEVICES"
        )
    return backend


def init_distributed(
    device: str = "auto", backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str | None = None
) -> DistInfo:
    """Join the job torchrun started (RANK / LOCAL_RANK / WORLD_SIZE), or run as one process.

    backend: 'nccl' (default on CUDA) or 'gloo' (default otherwise). On CUDA each process binds
    cuda:LOCAL_RANK. timeout_s bounds every collective: a rank that hangs makes the others fail
    with a CollectiveError after that long instead of hanging the job forever.
    init_method: where ranks meet (default torchrun's env://; tests pass a file:// store).
    Every rank checks the same things, so a bad setup fails on all ranks (rank 0 reports it).
    """
    global _timeout_s, _cpu_group, _joined_rank
    if timeout_s is None or timeout_s <= 0:
        raise UserError(f"dist_timeout_s={timeout_s} must be a positive number of seconds")
    _timeout_s = float(timeout_s)
    rank, local_rank, world_size = _env_int("RANK"), _env_int("LOCAL_RANK"), _env_int("WORLD_SIZE")
    device = resolve_device(device)
    if world_size is None or rank is None:
        if backend not in (None, "", "nccl", "gloo"):
            raise UserError(f"backend={backend!r} is not supported; use 'nccl' (GPUs) or 'gloo' (CPU)")
        return DistInfo(0, 0, 1, device)
    local_rank = rank if local_rank is None else local_rank
    backend = check_processes(device, backend, world_size, _env_int("LOCAL_WORLD_SIZE") or world_size)
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=_timeout_s)
    kwargs = dict(backend=backend, timeout=timeout, rank=rank, world_size=world_size)
    if init_method is not None:
        kwargs["init_method"] = init_method
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    with _collective_errors("joining the process group", joining=True):
        tdist.init_process_group(**kwargs)
        # any_rank() must never wait on the GPU: with NCCL it runs on a separate CPU (gloo) group.
        _cpu_group = tdist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _joined_rank = rank
    return DistInfo(rank, local_rank, world_size, device)


def restart_count() -> int:
    """How many times this job was restarted: torchrun's worker restarts after a failure plus SLURM's
    requeues (after preemption or the time limit with --requeue). 0: the first attempt, or neither."""
    return (_env_int("TORCHELASTIC_RESTART_COUNT") or 0) + (_env_int("SLURM_RESTART_COUNT") or 0)


def _is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


# How gloo (and NCCL's socket layer) word a peer that stopped answering or went away.
_PEER_FAILURE = re.compile(r"timed? ?out|timeout|connection (reset|closed|refused)|broken pipe|by peer", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


def as_collective_error(exc: BaseException, what: str = "a collective", joining: bool = False) -> CollectiveError | None:
    """The one-line CollectiveError for a collective that timed out or lost a peer; None for other errors.

    Registered with run_main, so it also covers collectives inside the model (FSDP's all-gathers,
    DDP's gradient all-reduce) and inside torch (the gradient norm of sharded gradients).
    joining: exc was raised while joining the process group (no job yet, but the same failures).
    """
    if isinstance(exc, CollectiveError):
        return exc
    in_job = joining or _joined_rank is not None or _is_initialized()
    if not (isinstance(exc, tdist.DistError) or (in_job and isinstance(exc, RuntimeError) and _PEER_FAILURE.search(str(exc)))):
        return None
    who = f"rank {_joined_rank}" if _joined_rank is not None else f"rank {os.environ.get('RANK', '?')}"
    return CollectiveError(
        f"{who}: {what} failed after waiting up to {_timeout_s:g}s (dist_timeout_s): another rank hung or died; "
        f"see its output above, or raise dist_timeout_s if a slow step is expected [{first_line(exc)}]",
        timed_out=bool(_TIMED_OUT.search(str(exc))),
    )


register_error_translator(as_collective_error)


@contextmanager
def _collective_errors(what: str, joining: bool = False):
    """Turn a collective that timed out or lost a peer into one clear CollectiveError line."""
    try:
        yield
    except (tdist.DistError, RuntimeError) as exc:
        error = as_collective_error(exc, what, joining)
        if error is None or error is exc:
            raise
        raise error from None


# ----------------------------------------------------------------------------------------------
# Parallelism: standalone functions applied to the raw model, in place where possible.


def _blocks(model: nn.Module, what: str) -> nn.ModuleList:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(
            f"{what} needs a model with transformer blocks in model.transformer.h "
            f"(got {type(model).__name__}); use --parallelism=ddp and --activation_checkpointing=False"
        )
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them.

    The block's forward is wrapped in place (non-reentrant torch.utils.checkpoint, which also
    replays dropout's RNG), so parameter names do not change and checkpoints stay the same.
    Apply before FSDP/DDP, as torchtitan does.
    """
    for block in _blocks(model, "activation_checkpointing"):
        if getattr(block, "_forge_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed_forward(self, *args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(checkpointed_forward, block)
        block._forge_checkpointed = True
    return model


def compile_problem(device, backend="inductor") -> str | None:
    """Why torch.compile cannot work on this device here, in one line (no C compiler for inductor's
    CPU kernels or Triton's launchers, Windows without Triton, ...); None when it works.

    A tiny function is compiled and run on the device: the same toolchain a model needs, in ~1 s.
    """
    try:
        torch.compile(_compile_probe, fullgraph=True, backend=backend)(torch.ones(8, device=device))
    except Exception as exc:  # inductor and triton raise many kinds (InductorError, CalledProcessError, ...)
        cause = getattr(exc, "inner_exception", None) or exc  # what the backend raised, without dynamo's advice
        return f"{type(cause).__name__}: {first_line(cause, limit=300)}"[:300]
    return None


def _compile_probe(x):
    return torch.nn.functional.gelu(x * 2 + 1).sum()


def apply_compile(model: nn.Module, per_block: bool = False, **options) -> bool:
    """torch.compile in place (module.compile(**options)): the module keeps its class and its parameter names.

    per_block: compile each transformer block on its own (torchtitan's way under FSDP2, whose
    per-block all-gather hooks then stay outside the compiled graphs); else the whole model.
    The attention kernel is chosen first (GPT.choose_attention_kernel), outside the compiled graph.
    Where torch.compile cannot work (compile_problem), one warning line and the model stays eager.
    Returns whether the model was compiled.
    """
    modules = _blocks(model, "per-block compile") if per_block else [model]
    problem = compile_problem(next(model.parameters()).device, options.get("backend", "inductor"))
    if problem is not None:
        if is_rank_zero():
            print(f"warning: compile=True but torch.compile cannot work here ({problem}); training without it "
                  "(eager, slower). Install a C compiler (e.g. gcc) or set --compile=False to silence this",
                  file=sys.stderr, flush=True)
        return False
    if hasattr(model, "choose_attention_kernel"):
        model.choose_attention_kernel()
    for module in modules:
        module.compile(**options)
    _compiled.add(model)
    return True


_compiled = weakref.WeakSet()  # models apply_compile compiled


def is_compiled(model: nn.Module) -> bool:
    """Whether apply_compile compiled this raw model (or its blocks)."""
    return model in _compiled


def apply_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    """Replicate the model on every rank; gradients are all-reduced (averaged) in backward.

    gradient_as_bucket_view: the gradients live in DDP's communication buckets (no second copy).
    """
    device_ids = [torch.device(dist.device).index] if torch.device(dist.device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def apply_fsdp(
    model: nn.Module, dist: DistInfo, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard parameters, gradients and optimizer state with FSDP2, one unit per block, then the root.

    param_dtype: the dtype parameters are all-gathered and computed in (bf16 halves the traffic);
    reduce_dtype: the dtype gradients are reduce-scattered in (default fp32 when param_dtype is
    lower, for an exact sum). The sharded master weights and the optimizer stay in fp32. The model
    is sharded in place and returned (its parameters become DTensors: build the optimizer after).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = _blocks(model, "parallelism='fsdp'")
    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world_size,))
    if param_dtype == torch.float32:
        param_dtype = None  # already the parameters' dtype: no casts
    if param_dtype is not None and reduce_dtype is None:
        reduce_dtype = torch.float32
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    # The root holds the embeddings, the final norm and the (tied) head: gathered once per step and kept
    # for backward (reshard_after_forward=False, as torchtitan does), since backward starts with the head
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def parallelize(
    model: nn.Module,
    dist: DistInfo,
    *,
    parallelism: str = "ddp",
    compile: bool = False,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    compile_options: dict | None = None,
) -> nn.Module:
    """Apply activation checkpointing, compile, then DDP or FSDP2; return the module the loop calls.

    On one process the model itself (checkpointed/compiled if asked): parallelism changes nothing
    there. Keep using the raw `model` for checkpoints: FSDP2 shards it in place, DDP wraps it,
    compile works in place, so its parameter names never gain prefixes.
    param_dtype (the training dtype) and reduce_dtype are FSDP2's mixed-precision policy; DDP and
    one process keep fp32 parameters and compute in the autocast dtype, so they ignore them.
    compile_options: keyword arguments for torch.compile (e.g. fullgraph=True, backend=...).
    """
    if parallelism not in PARALLELISMS:
        raise UserError(f"parallelism={parallelism!r} is not supported; use one of {', '.join(PARALLELISMS)}")
    if parallelism == "fsdp":
        _blocks(model, "parallelism='fsdp'")  # fail early, on every rank, for models without blocks
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    sharded = parallelism == "fsdp" and dist.is_distributed and _is_initialized()
    if compile:
        apply_compile(model, per_block=sharded, **(compile_options or {}))
    if not dist.is_distributed or not _is_initialized():
        return model
    if parallelism == "fsdp":
        return apply_fsdp(model, dist, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    return apply_ddp(model, dist)


def unwrap(module: nn.Module) -> nn.Module:
    """The raw model behind a DDP wrapper (compile and FSDP2 work in place: nothing to unwrap)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Around forward AND backward of a micro-step: gradients are synchronised only when enabled.

    Disable it on every micro-step but the last of an accumulation: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync(False) (gradients then accumulate unsharded until the last one).
    A no-op on one process. Collectives that time out inside it become a CollectiveError.
    """
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        sync_off = nullcontext()
    elif isinstance(model, DistributedDataParallel):
        sync_off = model.no_sync()
    elif isinstance(model, FSDPModule):
        sync_off = _fsdp_no_sync(model)
    else:
        sync_off = nullcontext()
    with _collective_errors("a forward/backward step (gradient all-reduce or FSDP gather)"), sync_off:
        yield


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------------------------
# Collectives: all no-ops on one process.


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (a new tensor; the input is untouched)."""
    if not _is_initialized() or tdist.get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    with _collective_errors("all_reduce_mean"):
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / tdist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank (e.g. 'SIGTERM seen somewhere').

    Runs over a CPU gloo group, so it never waits for the GPU.
    """
    if not _is_initialized() or tdist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    with _collective_errors("any_rank"):
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_cpu_group)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (any picklable value); the value itself on one process."""
    if not _is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    with _collective_errors("broadcast_object"):
        tdist.broadcast_object_list(box, src=src, group=_cpu_group)
    return box[0]


def barrier() -> None:
    """Wait for every rank (bounded by dist_timeout_s)."""
    if _is_initialized() and tdist.get_world_size() > 1:
        with _collective_errors("barrier"):
            tdist.barrier(group=_cpu_group)


_left_groups: list = []  # the groups destroy() left, released at exit (see destroy())
atexit.register(_left_groups.clear)


def destroy() -> None:
    """Leave the process group (safe to call twice, or on one process).

    The group itself is kept until this process exits. A DDP module still alive holds it in its C++
    reducer, whose release keeps the GIL: had the reducer the last reference, the group's destructor
    would join gloo's threads with the GIL held, while one of them may still need the GIL to free the
    tensor of the last collective: a deadlock at exit (torch issue 56297; seen after Ctrl-C on 2 CPU
    processes). Released from Python, a group lets the GIL go while it is destroyed.
    """
    global _cpu_group
    if _is_initialized():
        _left_groups.append(tdist.group.WORLD)
        tdist.destroy_process_group()
    _cpu_group = None


# ----------------------------------------------------------------------------------------------
# Checkpoint state: full, unsharded, CPU, keyed by parameter name; the same for every setup.

_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True)


def full_model_state_dict(model: nn.Module) -> dict:
    """The model's full state dict on the CPU (collective under FSDP: every rank must call it).

    In a process group, rank 0 receives the tensors and the other ranks an empty dict (only rank 0 saves).
    """
    with _collective_errors("gathering the model state"):
        return get_model_state_dict(unwrap(model), options=_SAVE)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state, keyed by parameter name, so it loads into any world size.

    {'state': {name: {...}}, 'param_groups': [{..., 'params': [names]}]}; rank 0 only in a group.
    """
    with _collective_errors("gathering the optimizer state"):
        return get_optimizer_state_dict(unwrap(model), optimizer, options=_SAVE)


def load_full_model_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a full state dict (every rank passes the whole dict; FSDP keeps only its shards)."""
    with _collective_errors("loading the model state"):
        set_model_state_dict(unwrap(model), state_dict, options=_LOAD)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a full optimizer state dict saved by any world size (or a classic index-keyed one)."""
    model = unwrap(model)
    state_dict = _name_keyed_optimizer_state(model, optimizer, state_dict)
    if all(p.device.type == "cpu" for p in model.parameters()):
        # On the CPU torch would adopt these tensors as the live state (and step them in place).
        state_dict = _cloned(state_dict)
    # torch initialises an empty optimizer's state with a zero-lr step, which it skips if gradients exist.
    optimizer.zero_grad(set_to_none=True)
    with _collective_errors("loading the optimizer state"):
        set_optimizer_state_dict(model, optimizer, state_dict, options=_LOAD)


def _name_keyed_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A classic `optimizer.state_dict()` (integer ids, e.g. a nanoGPT checkpoint) re-keyed by parameter name.

    Integer ids number the parameters in param-group order, so they map onto this optimizer's
    parameters when it was built the same way (same model, same grouping).
    """
    groups = state_dict.get("param_groups", [])
    if not groups or not all(isinstance(p, int) for g in groups for p in g.get("params", [])):
        return state_dict
    names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter: its first name, as torch keys it
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in groups for i in g["params"]]
    if len(saved_ids) != len(ordered):
        raise UserError(
            f"the checkpoint's optimizer has {len(saved_ids)} parameters but this model's has {len(ordered)}; "
            "the checkpoint is from a different model or optimizer setup"
        )
    id_to_name = {saved: names[id(p)] for saved, p in zip(saved_ids, ordered)}
    return {
        "state": {id_to_name[i]: s for i, s in state_dict.get("state", {}).items()},
        "param_groups": [{**g, "params": [id_to_name[i] for i in g["params"]]} for g in groups],
    }


def _cloned(obj):
    """A copy of nested dicts/lists/tuples with every tensor cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj
