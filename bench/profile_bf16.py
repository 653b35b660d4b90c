"""Where the UNet step's time goes on the CPU, per op class, against each class's floor.

Loads the random full-size SD 1.5 checkpoint (built once into bench/.cache/) with sdcli, runs the UNet
step as the pipeline does (CFG batch 2: x (2, 4, H/8, W/8), context (2, 77, 768)) under inference_mode,
warms up once, then:

- times a few steps (median);
- profiles one step with torch.profiler (CPU) and groups self CPU time by op class, and lists the top
  (op, input shapes) pairs (e.g. each attention level's calls);
- counts one step's FLOPs per op class with torch.utils.flop_counter.FlopCounterMode;
- measures the machine's matmul rate in the same dtype (4096x4096, median of a few) and its memory
  bandwidth (a 256 MB copy), so each class's floor is its FLOPs over the matmul rate or, for the
  memory-bound classes, an estimate of its bytes (every input read and one output written) over the
  bandwidth.

    .venv/bin/python bench/profile_bf16.py                          # bf16 at 512x512, channels_last
    .venv/bin/python bench/profile_bf16.py --dtype fp32 --size 256  # the fp32 comparison
    .venv/bin/python bench/profile_bf16.py --layouts cl,nchw        # also the contiguous layout

Its pieces alone, variants interleaved: bench/attention_bf16.py (attention kernels) and
bench/elementwise_bf16.py (GEGLU, the biased linear, GroupNorm+SiLU).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from random_models import ensure_checkpoint  # noqa: E402
from timing import cpu_model, git_revision, median  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
STEP_FLOOR_TARGET = 1.25  # the bf16 512x512 UNet step against its floor at the matmul rate
CLASSES = ("convolution", "GEMM/linear", "attention", "GroupNorm", "LayerNorm", "elementwise", "other")
COMPUTE_CLASSES = ("convolution", "GEMM/linear", "attention")
MEMORY_CLASSES = ("GroupNorm", "LayerNorm", "elementwise")
# Substrings of aten op names, first match wins (order matters: "linear" before "gelu" is irrelevant, but
# "_flash_attention" must not fall into "elementwise" via "_to").
PATTERNS = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "attention")),
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("GEMM/linear", ("addmm", "::mm", "bmm", "linear", "matmul", "baddbmm")),
    ("GroupNorm", ("group_norm",)),
    ("LayerNorm", ("layer_norm",)),
    (
        "elementwise",
        ("add", "mul", "silu", "gelu", "copy_", "::to", "_to_copy", "contiguous", "clone", "div", "sub", "cat"),
    ),
)


def op_class(name: str) -> str:
    """The class of an aten op by its profiler or FlopCounterMode name."""
    name = name if "::" in name else "aten::" + name.split(".")[-1]
    for cls, needles in PATTERNS:
        if any(n in name for n in needles):
            return cls
    return "other"


def matmul_rate(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul in `dtype`, median of `repeats` after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times) / 1e9


def memory_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of a large copy (read + write counted), median of `repeats`."""
    src = torch.empty(mb * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / median(times) / 1e9


def profile_step(
    step, itemsize: int, top_n: int = 12
) -> tuple[dict[str, float], dict[str, float], list[tuple[str, float]], list[tuple[str, float]]]:
    """Self CPU seconds and estimated bytes per class for one step, the top ops by self time, and the top
    (op, input shapes) pairs with their call counts."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    seconds: dict[str, float] = defaultdict(float)
    nbytes: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    by_shape: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = [s for s in event.input_shapes if s]
        by_shape[f"{event.key} x{event.count} {shapes}"] = event.self_cpu_time_total / 1e6
        cls = op_class(event.key)
        seconds[cls] += event.self_cpu_time_total / 1e6
        by_op[event.key] += event.self_cpu_time_total / 1e6
        sizes = [math.prod(s) for s in event.input_shapes if isinstance(s, list) and s]
        if sizes:  # inputs read once and an output as large as the largest input written once
            nbytes[cls] += event.count * itemsize * (sum(sizes) + max(sizes))
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:top_n]
    top_shapes = sorted(by_shape.items(), key=lambda kv: -kv[1])[:top_n]
    return dict(seconds), dict(nbytes), top, top_shapes


def cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU flash attention kernel, which FlopCounterMode does not count by itself."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(step) -> dict[str, float]:
    """FLOPs of one step per class: FlopCounterMode's convolutions and matmuls, and the CPU SDPA kernel."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        step()
    flops: dict[str, float] = defaultdict(float)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        flops[op_class(str(op))] += count
    return dict(flops)


def measure(model, dtype: torch.dtype, size: int, layout: str, repeats: int, rate: float, bandwidth: float) -> None:
    """Time, profile and count one layout; print the table."""
    unet = model.unet.to(memory_format=LAYOUTS[layout])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.full((2,), 500.0)

    def step():
        return unet(x, t, context)

    step()  # warm-up: oneDNN builds its kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = median(times)
    seconds, nbytes, top, top_shapes = profile_step(step, x.element_size())
    flops = count_flops(step)
    total_flops = sum(flops.values())
    profiled = sum(seconds.values())
    load = os.getloadavg()[0]
    print(
        f"\n## {size}x{size}, {str(dtype).removeprefix('torch.')}, {layout}: step median {step_s:.3f} s "
        f"(runs {', '.join(f'{s:.3f}' for s in times)}; profiled step {profiled:.3f} s self CPU); "
        f"{total_flops / 1e12:.3f} TFLOP, floor at the matmul rate {total_flops / rate / 1e9:.3f} s "
        f"(step / floor {step_s / (total_flops / rate / 1e9):.2f}); load average {load:.2f}"
    )
    if dtype == torch.bfloat16 and size == 512:
        met = step_s / (total_flops / rate / 1e9) <= STEP_FLOOR_TARGET
        print(f"target: bf16 step within {STEP_FLOOR_TARGET}x of the floor: {'met' if met else '**not met**'}")
    print(
        "| op class | self CPU s | share | GFLOP | GFLOP/s | of matmul rate | est. GB moved | GB/s "
        "| floor s | time / floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cls in CLASSES:
        s, f, b = seconds.get(cls, 0.0), flops.get(cls, 0.0), nbytes.get(cls, 0.0)
        if cls in COMPUTE_CLASSES:
            floor = f / rate / 1e9
            cells = [f"{f / 1e9:.0f}", f"{f / s / 1e9:.0f}" if s else "", f"{f / s / 1e9 / rate:.0%}" if s else ""]
            cells += ["", ""]
        elif cls in MEMORY_CLASSES:
            floor = b / bandwidth / 1e9
            cells = ["", "", "", f"{b / 1e9:.2f}", f"{b / s / 1e9:.1f}" if s else ""]
        else:  # allocations, views, upsampling: no meaningful bytes from input shapes
            floor, cells = 0.0, [""] * 5
        ratio = f"{s / floor:.1f}" if floor else ""
        floor_cell = f"{floor:.3f}" if floor else ""
        print(f"| {cls} | {s:.3f} | {s / profiled:.1%} | " + " | ".join(cells) + f" | {floor_cell} | {ratio} |")
    print(f"| total | {profiled:.3f} | 100% | {total_flops / 1e9:.0f} | | | | | | |")
    print("top ops by self CPU time: " + "; ".join(f"{name} {s:.3f} s" for name, s in top))
    print("top (op, calls, input shapes) by self CPU time:")
    for key, s in top_shapes:
        print(f"  {s:.3f} s  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are size/8)")
    parser.add_argument("--layouts", default="cl", help="comma-separated: cl (as sdcli ships on the CPU), nchw")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache")
    parser.add_argument("--emulated", action="store_true", help="profile bf16 even where the CPU emulates it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sdcli.checkpoint import load_model
    from sdcli.devices import cpu_has_native_bf16

    caps = torch.cpu.get_capabilities()
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and not cpu_has_native_bf16() and not args.emulated:
        print("bf16 profile skipped: this CPU emulates bf16 (no AVX512-BF16 or AMX); --emulated runs it anyway")
        return
    load = os.getloadavg()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; threads {args.threads}")
    print(f"torch {torch.__version__}; get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    print("get_capabilities() true: " + ", ".join(k for k, v in caps.items() if v is True))
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; sdcli {git_revision()}")
    rates = {name: matmul_rate(d) for name, d in DTYPES.items()}
    bandwidth = memory_bandwidth()
    print(
        "matmul 4096x4096: "
        + ", ".join(f"{name} {r:.0f} GFLOP/s" for name, r in rates.items())
        + f"; copy bandwidth {bandwidth:.1f} GB/s"
    )
    model = load_model(ensure_checkpoint(args.cache), device="cpu", dtype=dtype)
    with torch.inference_mode():
        for layout in args.layouts.split(","):
            measure(model, dtype, args.size, layout, args.repeats, rates[args.dtype], bandwidth)


if __name__ == "__main__":
    main()
