"""One whole txt2img job in its own process, for load time and peak memory: `job.py SIDE [options]`.

SIDE is `sdcli` or `diffusers`. The job loads the checkpoint, generates one image (prompt, negative
prompt, CFG 7.5, DPM++ 2M Karras on both sides) and writes it as PNG; with `--steps 0` it only loads.
diffusers' UNet and VAE are put in channels_last after loading (its faster layout on the CPU, as sdcli's;
in bf16 without native support its default layout takes oneDNN's reference path, ~30x slower still).
It prints one JSON line: import, load and generation seconds and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["sdcli", "diffusers"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True, help="diffusers config folder (see random_models.py)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    run = run_sdcli if args.side == "sdcli" else run_diffusers
    report = run(args, dtype, start)
    print(json.dumps(report))


def run_sdcli(args: argparse.Namespace, dtype, start: float) -> dict:
    from PIL import Image

    from sdcli.checkpoint import load_model
    from sdcli.pipeline import GenerationRequest, generate

    imported = time.perf_counter()
    model = load_model(args.checkpoint, device="cpu", dtype=dtype)
    loaded = time.perf_counter()
    if args.steps:
        request = GenerationRequest(
            PROMPT, NEGATIVE, width=args.size, height=args.size, steps=args.steps, cfg=7.5, seed=0
        )
        image = generate(model, [request])[0]
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(args.out)
    return _times(start, imported, loaded)


def run_diffusers(args: argparse.Namespace, dtype, start: float) -> dict:
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    imported = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        args.checkpoint,
        config=args.config,
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    loaded = time.perf_counter()
    if args.steps:
        for net in (pipe.unet, pipe.vae):
            net.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        result = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        )
        result.images[0].save(args.out)
    return _times(start, imported, loaded)


def _times(start: float, imported: float, loaded: float) -> dict:
    end = time.perf_counter()
    times = {"import_s": imported - start, "load_s": loaded - imported, "generate_s": end - loaded}
    return {**times, "peak_rss_gb": peak_rss_bytes() / 1e9}


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, which exec resets; ru_maxrss would also count the memory of
    the parent that forked us (the kernel carries its high-water mark across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


if __name__ == "__main__":
    sys.exit(main())
