"""Numeric precision: which dtype a run computes in, and the autocast context for it."""
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from forge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_has_bfloat16() -> bool:
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16)
        return True
    except (RuntimeError, TypeError):
        return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 where the device has it (Ampere+ GPUs), float16 on older GPUs, float32 on CPU/MPS.

    An explicit dtype the device cannot compute in is a UserError naming what to use instead.
    """
    kind = torch.device(device).type
    if dtype == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                             "use --dtype=float16 (with loss scaling) or --dtype=auto")
    if dtype == "bfloat16" and kind == "mps" and not _mps_has_bfloat16():
        raise UserError("dtype=bfloat16 is not supported by this MPS device (macOS 14+ needed); "
                             "use --dtype=float16 or --dtype=float32")
    if dtype == "float16" and kind == "cpu":
        raise UserError("dtype=float16 needs a GPU (CPU autocast has no float16 loss scaling); "
                             "use --dtype=float32 or --dtype=bfloat16 on the CPU")
    return DTYPES[dtype]


def autocast(device: str, dtype: torch.dtype):
    """torch.autocast for bfloat16/float16, a no-op context for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


MATMUL_PRECISIONS = ("highest", "high", "medium")


def cpu_has_bf16_matmul() -> bool:
    """True on x86 CPUs with bf16 dot-product hardware: AMX-BF16 or AVX512-BF16 (Xeon Sapphire Rapids+, AMD Zen 4+)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: oneDNN's bf16 path is not worth guessing at
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo) is not None


def set_matmul_precision(precision: str, device: str) -> str:
    """How float32 matmuls compute in this process (torch.set_float32_matmul_precision); returns what applies.

    'highest': exact float32. 'high': TF32 on Ampere+ GPUs (float32 runs ~8x faster; precision
    rarely matters), exact float32 on CPUs (the default).
    'medium': on a CPU with bf16 hardware, products in bfloat16 with float32 accumulation through
    oneDNN (AMX): ~3x faster matmuls, the CPU's counterpart of TF32; weights, activations and the
    optimizer stay float32. model.py's attention then uses plain batched matmuls on the CPU, because
    SDPA's kernels are slower on that path. Elsewhere 'medium' falls back to 'high'.
    """
    if precision not in MATMUL_PRECISIONS:
        raise UserError(f"matmul_precision={precision!r} is unknown; use {', '.join(MATMUL_PRECISIONS)}")
    on_cpu = torch.device(device).type == "cpu"
    if precision == "medium" and on_cpu and not cpu_has_bf16_matmul():
        precision = "high"
    torch.set_float32_matmul_precision(precision)
    return precision

