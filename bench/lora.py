"""What a LoRA costs: its merge time at load, and the UNet step with and without it (`make bench`).

The full-size random SD 1.5 checkpoint of bench/run.py gets a random kohya-ss LoRA (rank 32 on every
Linear and convolution of the UNet and the text encoder, LoCon included: more than real LoRAs adapt).
Loading with and without it, and a UNet step of each loaded model, are timed alternately (ABBA rounds)
after a warm-up; the lines print the medians and the ratio with/without. The LoRA is merged into the
weights while loading, so the step ratio should be 1 and the load ratio shows the merge time.

    .venv/bin/python bench/lora.py            # 512x512 (latents 64x64), CFG batch 2, bf16 if native else fp32
    .venv/bin/python bench/lora.py --quick    # 256x256, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from random_models import ensure_checkpoint  # noqa: E402
from timing import alternate, machine_description, median  # noqa: E402

from sdcli.checkpoint import load_model  # noqa: E402
from sdcli.convert import lora_aliases, lora_targets  # noqa: E402
from sdcli.devices import cpu_has_native_bf16  # noqa: E402
from sdcli.families import detect  # noqa: E402
from sdcli.header import read_header  # noqa: E402
from sdcli.lora import checkpoint_lora_patch, load_lora  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ensure_lora(checkpoint: Path, cache: Path, rank: int = 32) -> Path:
    """A random kohya-ss LoRA adapting every UNet and text-encoder weight of `checkpoint` (built once)."""
    from safetensors.torch import save_file

    path = cache / f"random-lora-r{rank}.safetensors"
    if path.exists():
        return path
    shapes = {key: info.shape for key, info in read_header(checkpoint).items()}
    names = {}  # checkpoint key -> its kohya module name (one of its aliases)
    aliases = lora_aliases(lora_targets(detect(shapes)), shapes)
    for alias, (_, key, _) in aliases.items():
        if alias.startswith(("lora_unet_", "lora_te_")) and len(shapes[key]) in (2, 4):
            names.setdefault(key, alias)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, module in names.items():
        out, inp, *kernel = shapes[key]
        r = min(rank, out, inp)
        tensors[f"{module}.lora_down.weight"] = torch.randn(r, inp, *kernel, generator=g, dtype=torch.float16) * 0.01
        ones = (1,) * len(kernel)
        tensors[f"{module}.lora_up.weight"] = torch.randn(out, r, *ones, generator=g, dtype=torch.float16) * 0.01
        tensors[f"{module}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    save_file(tensors, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="auto: bf16 where the CPU has native bf16, else fp32 (as sdcli)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache", help="where the checkpoint is built")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    size = 256 if args.quick else 512
    torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        args.dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    dtype = DTYPES[args.dtype]
    print("\n".join(machine_description(args.threads)), flush=True)

    checkpoint = ensure_checkpoint(args.cache)
    lora_path = ensure_lora(checkpoint, args.cache)

    def load_with_lora():
        patch = checkpoint_lora_patch(checkpoint, [(load_lora(lora_path), 1.0, 1.0)])
        return load_model(checkpoint, dtype=dtype, patch=patch)

    loads = alternate({"plain": lambda: load_model(checkpoint, dtype=dtype), "lora": load_with_lora}, repeats)
    plain, merged = load_model(checkpoint, dtype=dtype), load_with_lora()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    with torch.inference_mode():
        steps = alternate(
            {"plain": lambda: plain.unet(x, t, context), "lora": lambda: merged.unet(x, t, context)}, repeats
        )
    for what, times in ((f"load {args.dtype}", loads), (f"UNet step {size}x{size} {args.dtype} (CFG batch 2)", steps)):
        without, with_lora = median(times["plain"]), median(times["lora"])
        print(f"{what}: without LoRA {without:.3f} s, with a rank-32 LoRA {with_lora:.3f} s, "
              f"ratio {with_lora / without:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
