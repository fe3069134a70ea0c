"""Device choice and mixed precision: CUDA when present, CPU everywhere, no hard-coded device."""
from __future__ import annotations

import contextlib
import functools

import torch

from .config import DEVICES, PRECISIONS
from .errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when available; 'cuda' without a GPU is a user error, not a crash."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for but PyTorch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu or auto, or install a CUDA build of torch")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":  # Apple's GPU: chosen explicitly ("auto" stays CUDA or CPU, where it is measured)
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"--device mps was asked for but PyTorch sees no Apple GPU (MPS) (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        return torch.device("mps")
    raise InputError(f"unknown device {device!r}; use {', '.join(DEVICES)}")




@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """True on x86 CPUs with AMX (amx_bf16), where oneDNN ran generation 1.6-1.9x faster in bf16 than in
    fp32. With AVX512-BF16 alone (an Intel Xeon without AMX, 2026-12-08) bf16 was 1.4x slower: 10 frames
    at 128 x 128 x 32 took 2.91 s against 2.10 s, a training iteration 3.51 s against 2.52 s. Elsewhere
    bf16 has no hardware support to gain from. So fp32 stays wherever there is no AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bf16_faster_with(set(flags))


def bf16_faster_with(flags: set[str]) -> bool:
    """The rule of cpu_bf16_is_faster on a CPU's /proc/cpuinfo flags."""
    return "amx_bf16" in flags


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return precision


def uses_bf16(device: torch.device, precision: str = "auto", cpu_auto: bool = False) -> bool:
    """Whether the networks run in bf16: always on CUDA unless fp32 is asked for; on the CPU when bf16
    is asked for, or with `cpu_auto` (a caller whose result was measured within tolerance) where bf16
    is faster on this CPU (cpu_bf16_is_faster)."""
    check_precision(precision)
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_auto and cpu_bf16_is_faster()


def autocast(device: torch.device, enabled: bool = True, precision: str = "auto", cpu_auto: bool = False):
    """bf16 autocast (no loss scaling needed) where `uses_bf16`; otherwise a no-op."""
    if enabled and uses_bf16(device, precision, cpu_auto) and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
