"""Choosing the compute device and the precision for it.

`--dtype auto` picks the fastest precision the hardware runs natively: fp16 on CUDA and Apple MPS, bf16
on CPUs that execute bf16 matrix maths in hardware (Intel AMX-BF16 or AVX512-BF16, e.g. Sapphire Rapids,
Cooper Lake, AMD Zen 4), fp32 on every other CPU. bf16 is never guessed on a CPU: without those units
PyTorch emulates it, and on an AVX2-only CPU a bf16 convolution ran about 200x slower than in fp32.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from sdcli.errors import UsageError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# CPU features that execute bf16 dot products in hardware; oneDNN uses either for bf16 convs and matmuls.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise UsageError(f"unknown device {name!r}; use auto, cuda, mps or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision for `name` (auto, fp16, bf16, fp32) on `device`.

    `auto` is fp16 on CUDA and MPS, bf16 on a CPU with native bf16 (see `cpu_has_native_bf16`), and
    fp32 on any other CPU or device.
    """
    if name == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use auto, fp16, bf16 or fp32")
    return DTYPES[name]


def slow_dtype_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A one-line note when an explicitly chosen dtype will be emulated (very slowly) on `device`, else None."""
    if device.type != "cpu" or dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return None
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return (
        f"{name} on this CPU is emulated in software (no AMX-BF16/AVX512-BF16) and is many times slower than "
        "fp32; use --dtype fp32 or auto"
    )


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matrix maths in hardware (AMX-BF16 or AVX512-BF16).

    PyTorch's own CPU feature probe (`torch.cpu.get_capabilities`, cpuinfo-based, any OS) answers when
    this torch has it; otherwise the Linux `/proc/cpuinfo` flags; otherwise (older torch on macOS or
    Windows) no, because an unreliable yes costs far more than a missed speed-up.
    """
    capabilities = _torch_cpu_capabilities()
    if capabilities is not None:
        return any(bool(capabilities.get(flag)) for flag in NATIVE_BF16_FLAGS)
    if sys.platform.startswith("linux"):
        try:
            return bool(cpuinfo_flags(CPUINFO.read_text(errors="replace")) & NATIVE_BF16_FLAGS)
        except OSError:
            return False
    return False


def _torch_cpu_capabilities() -> Mapping[str, object] | None:
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch
    if get_capabilities is None:
        return None
    try:
        return get_capabilities()
    except RuntimeError:  # cpuinfo failed to initialise (unusual containers)
        return None


def cpuinfo_flags(text: str) -> set[str]:
    """The feature flags of a Linux `/proc/cpuinfo` text (x86 `flags`, ARM `Features`), of every processor."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags
