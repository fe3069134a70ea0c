"""CPU memory reuse for big tensors (no torch import: the CLI sets it up before any command runs).

glibc malloc's defaults hand every block above 32 MiB back to the kernel when it is freed, so each of
the hundreds of ~100 MB activations of a 128x128x32 pass is mapped anew and its pages are faulted in
and zeroed again: measured, 35-40% of a CPU generation's time. Serving blocks up to 1 GiB from the
heap and keeping up to 2 GiB of freed memory for reuse removes that cost (benchmarks/bench.py
--allocator default|tuned). The price: memory that ddm4d frees stays with the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def tune_cpu_allocator() -> bool:
    """Make glibc keep and reuse freed tensor memory, process-wide (the CLI calls it; call it
    yourself in a Python process dedicated to ddm4d). True if set; False without glibc (macOS,
    Windows, musl), where the defaults stay."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
