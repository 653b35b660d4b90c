"""Timing helpers: alternating medians, the machine's description, and a child's peak RSS."""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence


def alternate(contestants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each contestant `warmup` times, then `repeats` rounds of each once, in ABBA order.

    Alternating within each round spreads slow drifts (thermal state, other load on the machine) over
    all contestants alike; reversing the order every other round cancels a first-or-second bias.
    """
    names = list(contestants)
    for _ in range(warmup):
        for name in names:
            contestants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it (or /proc/cpuinfo, or platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        if m := re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE):
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: int) -> list[str]:
    """Lines that say what the numbers were measured on."""
    import diffusers
    import torch
    import transformers

    from sdcli.devices import cpu_has_native_bf16

    caps = getattr(torch.cpu, "get_capabilities", dict)()
    isa = [f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(f)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, {total_gib:.0f} GiB RAM, ISA: {', '.join(isa) or '?'}",
        f"native bf16 (sdcli.devices.cpu_has_native_bf16): {cpu_has_native_bf16()}",
        f"torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}), diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"threads: {threads}; load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"sdcli: {git_revision()}",
    ]


def git_revision() -> str:
    """The commit the measured sdcli code is at, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "sdcli") else ""
        return (git("rev-parse", "--short", "HEAD") or "unknown commit") + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Run a child process; return its stdout, wall seconds and peak RSS in MB from wait4.

    On Linux that RSS includes the parent's own high-water mark at fork time (the kernel carries it across
    exec), so it is exact only from a lean parent; job.py reports its own VmHWM instead.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and returns its own rusage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return stdout, wall, usage.ru_maxrss * _RSS_UNIT / 1e6


# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def self_peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT
