"""The SD 1.5 UNet's attention calls at 512x512 in bf16 on the CPU, under several kernels, interleaved.

Shapes are those of the CFG batch (2) with 8 heads: self-attention at the 64x64, 32x32 and 16x16 latent
levels (4096, 1024, 256 tokens; head dim 40, 80, 160) and cross-attention on the 77 text tokens. Each
variant runs on the same bf16 q, k, v; its output is compared with fp64 attention on those inputs (max and
mean absolute error), and all variants of a shape are timed in ABBA rounds (bench/timing.alternate), so the
load of a shared machine falls on all of them alike. Compile times (first call) are reported apart.

    .venv/bin/python bench/attention_bf16.py                          # all shapes, all variants
    .venv/bin/python bench/attention_bf16.py --shapes self64 --variants sdpa,flex --repeats 9
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import alternate, machine_description, median  # noqa: E402

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# name: (query tokens, key tokens, head dim); batch 2, 8 heads as in SD 1.5's CFG step at 512x512.
SHAPES = {
    "self64": (4096, 4096, 40),
    "cross64": (4096, 77, 40),
    "self32": (1024, 1024, 80),
    "cross32": (1024, 77, 80),
    "self16": (256, 256, 160),
    "cross16": (256, 77, 160),
    "self8": (64, 64, 160),
    "cross8": (64, 77, 160),
}
# Calls per UNet step: two input blocks and three output blocks per attention level, the middle block at 8x8.
CALLS_PER_STEP = {
    "self64": 5,
    "cross64": 5,
    "self32": 5,
    "cross32": 5,
    "self16": 5,
    "cross16": 5,
    "self8": 1,
    "cross8": 1,
}


def sdpa(q, k, v):
    """What sdcli runs today: the CPU flash kernel in bf16."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_fp32(q, k, v):
    """The same kernel on fp32 copies, output cast back to bf16."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def chunked(q, k, v, chunk: int = 256):
    """Per head, blocks of queries (fp32 scores of 4 MB at 4096 keys, cache-sized): fp32 QK^T, fp32 softmax,
    bf16 probabilities times bf16 v."""
    scale = 1 / math.sqrt(q.shape[-1])
    b, h, n, d = q.shape
    qs, kts, vs = q.reshape(b * h, n, d), k.float().reshape(b * h, -1, d).transpose(-1, -2), v.reshape(b * h, -1, d)
    out = torch.empty_like(qs)
    for j in range(b * h):
        for i in range(0, n, chunk):
            scores = torch.mm(qs[j, i : i + chunk].float() * scale, kts[j])
            torch.mm(scores.softmax(-1).to(v.dtype), vs[j], out=out[j, i : i + chunk])
    return out.reshape(b, h, n, d)


def math_bf16(q, k, v):
    """The unfused pattern (bmm, scale, softmax, bmm) in bf16, as oneDNN graph sees it."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(-1), v)


def math_fp32_softmax(q, k, v):
    """The same pattern with the softmax in fp32 (oneDNN graph has SDPA patterns with such type casts)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.float().softmax(-1).to(q.dtype), v)


def math_fp32(q, k, v):
    """The unfused pattern on fp32 copies, output cast back to bf16."""
    return math_bf16(q.float(), k.float(), v.float()).to(q.dtype)


def compiled(fn: Attention) -> Attention:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def flex() -> Attention:
    from torch.nn.attention.flex_attention import flex_attention

    return compiled(flex_attention)


def onednn_graph(q, k, v, fn: Attention = math_bf16) -> Attention:
    """`fn` traced with oneDNN graph fusion on (TorchScript's LLGA path). `last_executed_optimized_graph()`
    shows what fused: math_bf16 and math_fp32 become one oneDNNFusionGroup, math_fp32_softmax keeps its
    softmax out of the groups."""
    torch.jit.enable_onednn_fusion(True)
    traced = torch.jit.trace(fn, (q, k, v))
    for _ in range(2):  # the profiling executor fuses on the second or third call
        traced(q, k, v)
    return traced


VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Attention]] = {
    "sdpa": lambda q, k, v: sdpa,
    "sdpa_fp32": lambda q, k, v: sdpa_fp32,
    "sdpa_compiled": lambda q, k, v: compiled(sdpa),
    "flex": lambda q, k, v: flex(),
    "chunked": lambda q, k, v: chunked,
    "onednn_graph": onednn_graph,
    "onednn_graph_fp32_softmax": lambda q, k, v: onednn_graph(q, k, v, math_fp32_softmax),
    "onednn_graph_fp32": lambda q, k, v: onednn_graph(q, k, v, math_fp32),
}


def errors(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = (out.double() - reference).abs()
    return diff.max().item(), diff.mean().item()


def bench_shape(name: str, variants: list[str], repeats: int) -> dict[str, float]:
    """Print one shape's table; return each variant's median seconds per call."""
    n, m, d = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, t, d, generator=g).to(torch.bfloat16) for t in (n, m, m))
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    flops = 4 * 2 * 8 * n * m * d
    calls, first = {}, {}
    for variant in variants:
        start = time.perf_counter()
        fn = VARIANTS[variant](q, k, v)
        out = fn(q, k, v)
        first[variant] = (time.perf_counter() - start, *errors(out, reference))
        calls[variant] = lambda fn=fn: fn(q, k, v)
    times = alternate(calls, repeats)
    base = median(times[variants[0]])
    load = os.getloadavg()[0]
    print(f"\n## {name}: q (2, 8, {n}, {d}), k/v (2, 8, {m}, {d}) bf16; load average after {load:.2f}")
    print(f"| variant | min ms | median ms | GFLOP/s (min) | {variants[0]} / variant (median) | max abs err | "
          "mean abs err | first call s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        t = times[variant]
        first_s, max_err, mean_err = first[variant]
        print(
            f"| {variant} | {min(t) * 1e3:.1f} | {median(t) * 1e3:.1f} | {flops / min(t) / 1e9:.0f} | "
            f"{base / median(t):.2f} | {max_err:.1e} | {mean_err:.1e} | {first_s:.1f} |"
        )
    return {variant: median(times[variant]) for variant in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the first is the baseline")
    parser.add_argument("--repeats", type=int, default=7, help="ABBA rounds (min and median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(machine_description(args.threads)))
    variants = args.variants.split(",")
    per_step = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        for name in args.shapes.split(","):
            for variant, seconds in bench_shape(name, variants, args.repeats).items():
                per_step[variant] += CALLS_PER_STEP[name] * seconds
    print(
        "\nper UNet step over the shapes measured (calls x median): "
        + ", ".join(f"{v} {s:.3f} s" for v, s in per_step.items())
    )


if __name__ == "__main__":
    main()
