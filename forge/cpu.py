"""Process settings that make training on a CPU fast, beyond the arithmetic."""
import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts: bigger blocks still come from (and go back to) mmap
TRIM_THRESHOLD = 1024 * 1024 * 1024  # keep up to 1 GiB of freed memory at the top of the heap


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB for reuse; True if it took the settings.

    PyTorch's CPU allocator has no cache: every tensor is a malloc and a free. A training step frees
    its activations and oneDNN's scratch buffers and allocates them again in the next step. By
    default glibc serves blocks over a dynamic threshold (128 KiB at first) with mmap and trims the
    heap top, so that memory goes back to the kernel and every step page-faults it in again: about
    2,300-5,400 minor faults per step of config/shakespeare_char_cpu.py, which took its step from
    18.3 to 25.1 ms (docs/BENCHMARKS.md). With these settings the memory stays mapped at the steps' peak, which a
    training process reaches every step anyway. A no-op (False) where the C library is not glibc.
    """
    libc_name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
