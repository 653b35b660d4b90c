"""The SD 1.5 UNet's memory-bound pieces at 512x512 in bf16 on the CPU, eager against fused or reordered forms.

Three pieces, each at its largest shape in the CFG step (batch 2, 64x64 latents, 320 channels), as sdcli runs
them (channels_last feature maps, (B, HW, C) token rows):

- geglu: `x * gelu(gate)` on the two halves of GEGLU's projection (2, 4096, 2560); 5 calls per step;
- linear: GEGLU's projection 320 -> 2560 with bias (aten's addmm first copies the bias into the output);
  5 calls per step;
- norm_silu: GroupNorm(32) then SiLU on (2, 320, 64, 64); 13 + 11 calls per step at this size and the next.

Variants are timed in ABBA rounds (bench/timing.alternate) and compared with the same computation in fp64 on
the same bf16 inputs. "compiled" is torch.compile of the eager form (one fused loop), its first call apart.

    .venv/bin/python bench/elementwise_bf16.py --repeats 9
"""

from __future__ import annotations

import argparse
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


def geglu(h: torch.Tensor) -> torch.Tensor:
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


def geglu_in_place(h: torch.Tensor) -> torch.Tensor:
    x, gate = h.chunk(2, dim=-1)
    return F.gelu(gate).mul_(x)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, b)


def linear_then_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.t()).add_(b)


def norm_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


def norm_silu_in_place(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, 32, w, b, 1e-5), inplace=True)


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def cases() -> dict[str, tuple[tuple[torch.Tensor, ...], dict[str, Callable]]]:
    """Each piece's bf16 inputs and its variants (the first is what sdcli runs)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    x_map = randn(2, 320, 64, 64).contiguous(memory_format=torch.channels_last)
    return {
        "geglu": ((randn(2, 4096, 2560),), {"eager": geglu, "gelu_mul_": geglu_in_place, "compiled": compiled(geglu)}),
        "linear": (
            (randn(2, 4096, 320), randn(2560, 320, scale=320**-0.5), randn(2560)),
            {"eager": linear, "matmul_add_": linear_then_bias},
        ),
        "norm_silu": (
            (x_map, 1 + randn(320, scale=0.1), randn(320, scale=0.1)),
            {"eager": norm_silu, "silu_inplace": norm_silu_in_place, "compiled": compiled(norm_silu)},
        ),
    }


def bench_case(name: str, inputs: tuple[torch.Tensor, ...], variants: dict[str, Callable], repeats: int) -> None:
    reference = next(iter(variants.values()))(*(t.double() for t in inputs))
    calls, first = {}, {}
    for variant, fn in variants.items():
        start = time.perf_counter()
        out = fn(*inputs)
        diff = (out.double() - reference).abs()
        first[variant] = (time.perf_counter() - start, diff.max().item(), diff.mean().item())
        calls[variant] = lambda fn=fn: fn(*inputs)
    times = alternate(calls, repeats)
    base = median(times["eager"])
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    print(f"\n## {name}: {shapes} bf16; load average after {os.getloadavg()[0]:.2f}")
    print("| variant | min ms | median ms | eager / variant (median) | max abs err | mean abs err | first call s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, t in times.items():
        first_s, max_err, mean_err = first[variant]
        print(
            f"| {variant} | {min(t) * 1e3:.1f} | {median(t) * 1e3:.1f} | {base / median(t):.2f} | "
            f"{max_err:.1e} | {mean_err:.1e} | {first_s:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="geglu,linear,norm_silu")
    parser.add_argument("--repeats", type=int, default=7, help="ABBA rounds (min and median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(machine_description(args.threads)))
    all_cases = cases()
    with torch.inference_mode():
        for name in args.cases.split(","):
            bench_case(name, *all_cases[name], args.repeats)


if __name__ == "__main__":
    main()
