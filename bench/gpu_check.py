"""GPU check (run by bench/gpu.sh): fp16-on-GPU accuracy against fp32 on the CPU, then it/s against diffusers.

1. Accuracy, same random weights: one UNet call (CFG batch 2, 512x512 latents) and a whole txt2img run
   (sdcli, DPM++ 2M Karras), fp16 on the GPU against fp32 on the CPU; relative errors. Then sdcli's attention
   in fp16 on SD 2.x-sized products (q.k^T past fp16's 65504 before the scale, why diffusers upcasts SD 2.1's
   attention) with each SDPA kernel, against float64 on the same fp16 values: it must stay finite and close.
2. Speed, fp16, 512x512, 20 steps, batch 1, CFG 7.5: sampling it/s of sdcli and diffusers (same
   sampler and card, alternating), eager and with torch.compile of the UNet. The step rate is timed
   with CUDA events recorded at each step's callback (no host synchronisation inside the loop), from the
   end of step 1 to the end of the last step; the whole call (text encoding, sampling, VAE decode) is
   timed separately with a synchronisation at the end. Eager mode also times sdcli with its UNet and VAE
   in channels_last ("sdcli+CL"), to learn whether that layout should ship on GPUs too (it does on CPUs).

Prints a table; with $OUT set, also writes $OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from random_models import ensure_checkpoint, ensure_diffusers_config  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the speed runs")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and mode")
    parser.add_argument("--accuracy-steps", type=int, default=10, help="steps of the CPU-vs-GPU txt2img run")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script (with --dtype fp32)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = parser.parse_args()
    args.torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp16 is what is measured; keep fp32 maths exact
    started = time.perf_counter()
    checkpoint = ensure_checkpoint(args.cache)
    config = ensure_diffusers_config(args.cache)
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"card: {card}; torch {torch.__version__}, CUDA {torch.version.cuda}; CPU threads {torch.get_num_threads()}")
    print(f"checkpoint ready after {time.perf_counter() - started:.0f} s", flush=True)

    results: dict = {"card": card, "torch": torch.__version__}
    results["accuracy"] = accuracy(checkpoint, args)
    results["attention_fp16"] = attention_fp16(args.device)
    print(f"accuracy done after {time.perf_counter() - started:.0f} s", flush=True)
    results["speed"] = speed(checkpoint, config, args)
    print_table(results, args)
    print(f"total {time.perf_counter() - started:.0f} s")
    if out := os.environ.get("OUT"):
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=2))


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference relative to the expected tensor's max and mean magnitude."""
    a, e = actual.double().cpu(), expected.double().cpu()
    return {
        "max_rel": ((a - e).abs().max() / e.abs().max()).item(),
        "mean_rel": ((a - e).abs().mean() / e.abs().mean()).item(),
    }


@torch.inference_mode()
def accuracy(checkpoint: Path, args: argparse.Namespace) -> dict:
    from sdcli.checkpoint import load_model
    from sdcli.pipeline import GenerationRequest, generate

    g = torch.Generator().manual_seed(0)
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([999.0, 400.0])
    context = torch.randn(2, 77, 768, generator=g)
    request = GenerationRequest(
        PROMPT, NEGATIVE, width=args.size, height=args.size, steps=args.accuracy_steps, cfg=7.5, seed=1
    )
    outputs = {}
    for side, device, dtype in (("reference", "cpu", torch.float32), ("tested", args.device, args.torch_dtype)):
        model = load_model(checkpoint, device=device, dtype=dtype)
        unet_out = model.unet(x.to(device, dtype), t.to(device), context.to(device, dtype)).float().cpu()
        image = generate(model, [request]).float().cpu()
        outputs[side] = (unet_out, image)
        del model
        empty_cache(device)
    tested, reference = outputs["tested"], outputs["reference"]
    return {
        "unet": relative_errors(tested[0], reference[0]),
        "txt2img": relative_errors(tested[1], reference[1]),
        "txt2img_mean_abs_pixels_0_255": ((tested[1] - reference[1]).abs().mean() * 127.5).item(),
    }


@torch.inference_mode()
def attention_fp16(device: str) -> dict:
    """sdcli's attention in fp16 with products that overflow a naive fp16 q.k^T, per SDPA kernel: whether the
    output is finite, and its max and mean absolute error against float64 on the same fp16 inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdcli.models.layers import attention

    g = torch.Generator().manual_seed(0)
    shape, heads = (1, 4096, 320), 5  # SD 2.x's first level at 512x512: 64-wide heads over 64x64 tokens
    q, k = ((torch.randn(shape, generator=g) * 100).half() for _ in range(2))
    v = torch.randn(shape, generator=g).half()
    qd, kd, vd = (t.double().reshape(1, -1, heads, 64).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qd @ kd.transpose(-1, -2) / 8, dim=-1)
    reference = (weights @ vd).transpose(1, 2).reshape(shape)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):  # fmt: skip
        try:
            with sdpa_kernel(backend):
                out = attention(q.to(device), k.to(device), v.to(device), heads).double().cpu()
        except RuntimeError as e:  # a kernel this device or build does not have
            results[backend.name] = {"error": str(e).splitlines()[0][:60]}
            continue
        error = (out - reference).abs()
        results[backend.name] = {
            "finite": bool(out.isfinite().all()), "max_abs": error.max().item(), "mean_abs": error.mean().item()
        }  # fmt: skip
    return results


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


class StepTimer:
    """Marks at each step's end; `rate()` is steps per second after the first step.

    On CUDA a mark is an event recorded on the stream, so marking never waits for the GPU; elsewhere it
    is the host clock.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def rate(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            seconds = self.marks[0].elapsed_time(self.marks[-1]) / 1000
        else:
            seconds = self.marks[-1] - self.marks[0]
        return (len(self.marks) - 1) / seconds


def sdcli_runner(checkpoint: Path, args: argparse.Namespace, channels_last: bool = False):
    from sdcli.checkpoint import load_model
    from sdcli.pipeline import GenerationRequest, generate

    model = load_model(checkpoint, device=args.device, dtype=args.torch_dtype)
    if channels_last:
        for net in (model.unet, model.vae):
            net.to(memory_format=torch.channels_last)
    request = GenerationRequest(PROMPT, NEGATIVE, width=args.size, height=args.size, steps=args.steps, cfg=7.5)

    def run(steps: int | None = None) -> StepTimer:
        timer = StepTimer(args.device)
        r = request if steps is None else GenerationRequest(PROMPT, NEGATIVE, args.size, args.size, steps, 7.5)
        generate(model, [r], callback=lambda _info: timer.mark())
        return timer

    def compile_unet() -> None:
        from sdcli.pipeline import compile_unet as sdcli_compile_unet  # what `--compile` does

        if args.compile_mode == "default":
            sdcli_compile_unet(model, warn=lambda message: print(f"  sdcli: {message}", flush=True))
        else:
            model.unet = torch.compile(model.unet, mode=args.compile_mode)

    return run, compile_unet


def diffusers_runner(checkpoint: Path, config: Path, args: argparse.Namespace):
    import diffusers
    from diffusers import StableDiffusionPipeline

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(config),
        local_files_only=True,
        torch_dtype=args.torch_dtype,
        safety_checker=None,
        requires_safety_checker=False,
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int | None = None) -> StepTimer:
        timer = StepTimer(args.device)

        def on_step_end(_pipe, _step, _timestep, kwargs):
            timer.mark()
            return kwargs

        pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=args.size,
            width=args.size,
            num_inference_steps=steps or args.steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(0),
            callback_on_step_end=on_step_end,
        )
        return timer

    def compile_unet() -> None:
        pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)

    return run, compile_unet


def speed(checkpoint: Path, config: Path, args: argparse.Namespace) -> dict:
    all_sides = {
        "sdcli": sdcli_runner(checkpoint, args),
        "diffusers": diffusers_runner(checkpoint, config, args),
        "sdcli+CL": sdcli_runner(checkpoint, args, channels_last=True),
    }
    modes = ["eager"] if args.skip_compile else ["eager", "compile"]
    results: dict = {}
    for mode in modes:
        # The layout experiment runs eager only: compiling a third UNet would cost minutes of the budget.
        sides = {name: side for name, side in all_sides.items() if mode == "eager" or name != "sdcli+CL"}
        for name, (run, compile_unet) in sides.items():
            if mode == "compile":
                compile_unet()
            start = time.perf_counter()
            run(3)  # warm-up (and, compiled, the compilation itself)
            synchronize(args.device)
            results[f"{name} {mode} warm-up s"] = time.perf_counter() - start
            print(f"  {name} {mode}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        walls: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.repeats):
            for name in sides if i % 2 == 0 else reversed(list(sides)):
                synchronize(args.device)
                start = time.perf_counter()
                timer = sides[name][0]()
                synchronize(args.device)
                walls[name].append(time.perf_counter() - start)
                rates[name].append(timer.rate())
        for name in sides:
            results[f"{name} {mode}"] = {
                "it_s": statistics.median(rates[name]),
                "wall_s": statistics.median(walls[name]),
                "all_it_s": rates[name],
            }
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    acc = results["accuracy"]
    print(f"\n## GPU check on {results['card']} (torch {results['torch']})\n")
    print(f"| {args.dtype} {args.device} vs fp32 CPU (same random weights) | max rel | mean rel |")
    print("|---|---:|---:|")
    print(
        f"| UNet, CFG batch 2, {args.size}x{args.size} | {acc['unet']['max_rel']:.2e} | {acc['unet']['mean_rel']:.2e} |"
    )
    print(
        f"| txt2img {args.size}x{args.size}, {args.accuracy_steps} steps (mean abs "
        f"{acc['txt2img_mean_abs_pixels_0_255']:.2f}/255) | {acc['txt2img']['max_rel']:.2e} | "
        f"{acc['txt2img']['mean_rel']:.2e} |"
    )
    print("\n| fp16 attention, q.k^T past 65504 before the scale | finite | max abs | mean abs |")
    print("|---|---|---:|---:|")
    for backend, row in results["attention_fp16"].items():
        if "error" in row:
            print(f"| {backend} | unavailable: {row['error']} | | |")
        else:
            print(f"| {backend} | {row['finite']} | {row['max_abs']:.2e} | {row['mean_abs']:.2e} |")
    setting = f"{args.size}x{args.size}, {args.steps} steps, batch 1, CFG, {args.dtype}"
    print(f"\n| {setting} | sdcli it/s | diffusers it/s | ratio | sdcli s/image | diffusers s/image |")
    print("|---|---:|---:|---:|---:|---:|")
    speed = results["speed"]
    for mode, ours_name in (("eager", "sdcli"), ("eager", "sdcli+CL"), ("compile", "sdcli")):
        ours, theirs = speed.get(f"{ours_name} {mode}"), speed.get(f"diffusers {mode}")
        if ours and theirs:
            print(
                f"| {mode}{'' if ours_name == 'sdcli' else ', sdcli channels_last'} | {ours['it_s']:.1f} | "
                f"{theirs['it_s']:.1f} | {ours['it_s'] / theirs['it_s']:.2f} | {ours['wall_s']:.2f} | "
                f"{theirs['wall_s']:.2f} |"
            )


if __name__ == "__main__":
    main()
