"""One few-step txt2img job with diffusers in its own process: `diffusers_job.py --checkpoint FILE --config DIR ...`.

The reference side of bench/fast.py. It loads a single-file SD 1.x/2.x checkpoint with
`StableDiffusionPipeline.from_single_file` (offline config folder, see random_models.py), optionally with
TAESD (`AutoencoderTiny.from_pretrained(folder)`, passed in so the full VAE is not loaded), sets the
scheduler the distilled models' cards use (SD-Turbo: Euler ancestral with "trailing" timesteps; LCM:
`LCMScheduler.from_config`), generates a batch and writes it as PNGs. The UNet and the full VAE are put in
channels_last, as in job.py. It prints one JSON line: import, load and generation seconds and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from job import PROMPT, _times

SCHEDULERS = ("euler_a_trailing", "lcm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True, help="diffusers config folder (see random_models.py)")
    parser.add_argument("--taesd", help="an AutoencoderTiny folder to decode with instead of the full VAE")
    parser.add_argument("--scheduler", choices=SCHEDULERS, required=True)
    parser.add_argument("--prediction", choices=["eps", "v"], default="eps")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=0.0, help="guidance_scale (<= 1: no guidance)")
    parser.add_argument("--batch", type=int, default=1, help="images in one call (num_images_per_prompt)")
    parser.add_argument("--out", type=Path, required=True, help="PNG path; image i of a batch gets -i")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    import diffusers
    import torch
    from diffusers import AutoencoderTiny, EulerAncestralDiscreteScheduler, LCMScheduler, StableDiffusionPipeline

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    imported = time.perf_counter()
    extra = {"vae": AutoencoderTiny.from_pretrained(args.taesd, torch_dtype=dtype)} if args.taesd else {}
    pipe = StableDiffusionPipeline.from_single_file(
        args.checkpoint,
        config=args.config,
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        **extra,
    )
    prediction = {"eps": "epsilon", "v": "v_prediction"}[args.prediction]
    if args.scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    else:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", prediction_type=prediction
        )
    loaded = time.perf_counter()
    for net in (pipe.unet, pipe.vae):
        if not args.taesd or net is pipe.unet:
            net.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        num_images_per_prompt=args.batch,
        generator=torch.Generator().manual_seed(0),
    ).images
    for i, image in enumerate(images):
        image.save(args.out if len(images) == 1 else args.out.with_stem(f"{args.out.stem}-{i}"))
    print(json.dumps(_times(start, imported, loaded)))


if __name__ == "__main__":
    sys.exit(main())
