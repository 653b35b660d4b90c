"""SDXL base, full size, random weights: the UNet step against diffusers' and a whole job's memory (`make bench`).

The checkpoint (SDXL base's shapes in the original single-file layout, fp16, 6.9 GB; random_models.py) is
built once into bench/.cache. Two measurements:
- a whole 1-step txt2img job (prompt and negative prompt, so CFG runs a batch of 2) through sdcli's command
  line in a child process (bench/cli_job.py): wall time and peak RSS, at 1024x1024 in bf16 on the CPU, to
  show that SDXL fits in 24 GB. It runs first, while this process is still small;
- one CFG UNet step (batch 2) at 512x512, and 1024x1024 with `--full`, by sdcli's UNet and by diffusers'
  `UNet2DConditionModel` (converted by diffusers' own single-file code) on the same weights, in this
  process, timed alternately (ABBA) after a warm-up; diffusers in its default layout and in channels_last,
  its better median the baseline (as bench/run.py). The compute dtype is bf16 where the CPU has native bf16,
  else fp32 (both UNets then take 10 GB each: 21 GB of RAM in all).

`--device cuda` runs both in fp16 on the GPU (bench/gpu.sh calls it): the job reports torch's peak
allocated GPU memory, with and without `--low-memory`. Nothing here asserts a GPU target.

    .venv/bin/python bench/sdxl.py                 # step at 512x512, job at 1024x1024
    .venv/bin/python bench/sdxl.py --full          # step at 512x512 and 1024x1024
    .venv/bin/python bench/sdxl.py --quick         # step at 256x256, job at 512x512, fewer repeats
    .venv/bin/python bench/sdxl.py --device cuda   # on a GPU, fp16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from random_models import TESTS, ensure_checkpoint  # noqa: E402
from run import Row, format_table  # noqa: E402
from timing import alternate, machine_description, median, run_child  # noqa: E402

from sdcli.devices import cpu_has_native_bf16  # noqa: E402
from sdcli.families import SDXL, UNET_PREFIX  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RSS_TARGET_GB = 24.0  # SDXL must run on a 24 GB CPU machine in bf16 (issue 13)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(machine_description(args.threads)), flush=True)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "bf16" if cpu_has_native_bf16() else "fp32")
    print(f"device {device}, UNet step dtype {dtype_name}", flush=True)
    started = time.perf_counter()
    checkpoint = ensure_checkpoint(args.cache, SDXL)
    print(f"checkpoint: {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB, fp16, random weights)", flush=True)

    rows = [] if args.skip_job else bench_jobs(checkpoint, args)
    if not args.skip_step:
        rows += bench_unet_step(checkpoint, device, dtype_name, args)
    print("\n" + format_table(rows))
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "ratio": r.ratio} for r in rows], indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="step at 256x256, job at 512x512, fewer repeats")
    parser.add_argument("--full", action="store_true", help="also the UNet step at 1024x1024")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="of the UNet step [default: fp16 on CUDA, "
                        "bf16 on CPUs with native bf16, else fp32]")  # fmt: skip
    parser.add_argument("--job-dtype", choices=sorted(DTYPES), help="[default: fp16 on CUDA, else bf16]")
    parser.add_argument("--job-size", type=int, help="whole job's width and height (default 1024, quick 512)")
    parser.add_argument("--repeats", type=int, help="timed rounds of the UNet step (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--skip-job", action="store_true", help="only the UNet step")
    parser.add_argument("--skip-step", action="store_true", help="only the whole job")
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache", help="where the checkpoint is built")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.job_size = args.job_size or (512 if args.quick else 1024)
    args.job_dtype = args.job_dtype or ("fp16" if args.device == "cuda" else "bf16")
    return args


def bench_jobs(checkpoint: Path, args: argparse.Namespace) -> list[Row]:
    """A whole 1-step job through sdcli's command line in a child process (on CUDA also with --low-memory)."""
    out = args.cache / "sdxl-jobs"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SDCLI_WEIGHTS_DIR": str(args.cache / "sdcli-weights"),  # never the user's folders
        "SDCLI_CACHE_DIR": str(args.cache / "sdcli-cache"),
    }
    size, dtype = args.job_size, args.job_dtype
    variants = [()] if args.device == "cpu" else [(), ("--low-memory",)]
    rows = []
    for extra in variants:
        cmd = [
            sys.executable, str(BENCH / "cli_job.py"), "txt2img", PROMPT, "-n", NEGATIVE, "-m", str(checkpoint),
            "-W", str(size), "-H", str(size), "--steps", "1", "--seed", "0", "--dtype", dtype,
            "--device", args.device, "--offline", "--quiet", "--overwrite", "-o", str(out / f"sdxl-{size}.png"),
            *extra,
        ]  # fmt: skip
        stdout, wall, _ = run_child(cmd, env=env)
        report = json.loads(stdout.strip().splitlines()[-1])
        if report["exit_code"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {report['exit_code']}")
        what = f"SDXL {size}x{size} 1-step job (CFG), {dtype} on {args.device}{' ' + ' '.join(extra) if extra else ''}"
        print(f"  {what}: done", flush=True)
        rows.append(Row(f"{what}: whole process wall", wall, None))
        rss = Row(f"{what}: peak RSS", report["peak_rss_gb"], None, unit="GB")
        if args.device == "cpu" and dtype == "bf16" and size == 1024:
            rss.target, rss.met = f"<= {RSS_TARGET_GB:g} GB", rss.sdcli <= RSS_TARGET_GB
        rows.append(rss)
        if "cuda_peak_gb" in report:
            rows.append(Row(f"{what}: peak GPU memory allocated", report["cuda_peak_gb"], None, unit="GB",
                            target="measured only"))  # fmt: skip
    return rows


def load_sdcli_unet(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """sdcli's SDXL UNet alone, loaded as load_model loads it (channels_last on the CPU)."""
    from sdcli.checkpoint import TensorReader, load_component
    from sdcli.header import read_header
    from sdcli.models.unet import UNetModel

    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    with TensorReader(checkpoint) as reader:
        build = partial(UNetModel, SDXL.unet)
        return load_component(checkpoint, reader, read_header(checkpoint), UNET_PREFIX, build, dtype, device, layout)


def load_diffusers_unet(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """diffusers' SDXL UNet ("text_time" addition embedding) holding the file's UNet weights, converted by
    diffusers' single-file code (tests/reference.py), in `dtype` on `device`."""
    from safetensors import safe_open

    sys.path.insert(0, str(TESTS))
    from reference import reference_unet_sdxl

    with safe_open(str(checkpoint), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(UNET_PREFIX)]
        state = {k[len(UNET_PREFIX) :]: f.get_tensor(k).to(device, dtype) for k in keys}
    unet = reference_unet_sdxl(state, SDXL.unet, device="meta")  # meta + assign: takes these tensors, no copy
    return unet.to(device)


@torch.inference_mode()
def bench_unet_step(checkpoint: Path, device: torch.device, dtype_name: str, args: argparse.Namespace) -> list[Row]:
    """One CFG UNet step (batch 2) per size, sdcli against diffusers, alternating."""
    from sdcli.models.sdxl_size import sdxl_y

    dtype = DTYPES[dtype_name]
    ours = load_sdcli_unet(checkpoint, dtype, device)
    theirs = load_diffusers_unet(checkpoint, dtype, device)
    sizes = [256] if args.quick else [512, 1024] if args.full else [512]
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 2048, generator=g).to(device, dtype)
    pooled = torch.randn(2, 1280, generator=g).to(device, dtype)
    t = torch.full((2,), 500.0, device=device)

    def synced(fn):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    def fns(size: int, suffix: str) -> dict:
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
        sizes = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device)  # original, crop, target
        added = {"text_embeds": pooled, "time_ids": sizes.to(dtype)}
        return {
            "sdcli" + suffix: synced(lambda: ours(x, t, context, sdxl_y(pooled, sizes))),
            "diffusers" + suffix: synced(lambda: theirs(x, t, context, added_cond_kwargs=added).sample),
        }

    check = fns(sizes[0], "")  # the same weights and inputs: the two UNets' outputs agree to the dtype's rounding
    ours_out, theirs_out = (torch.as_tensor(check[side]()).float() for side in ("sdcli", "diffusers"))
    error = ((ours_out - theirs_out).abs().max() / theirs_out.abs().max()).item()
    print(f"  outputs: max |sdcli - diffusers| / max |diffusers| = {error:.3g} ({dtype_name})", flush=True)
    formats = ["", "+CL"] if device.type == "cpu" else [""]
    times: dict[str, dict[str, list[float]]] = {}
    for suffix in formats:
        if suffix:
            theirs.to(memory_format=torch.channels_last)
        for size in sizes:
            key = f"SDXL UNet step {size}x{size} {dtype_name} on {device.type} (CFG batch 2)"
            times.setdefault(key, {}).update(alternate(fns(size, suffix), args.repeats))
            print(f"  {key} {suffix or 'default layout'}: done", flush=True)
    rows = []
    for key, by_side in times.items():
        medians = {side: median(v) for side, v in by_side.items() if side.startswith("diffusers")}
        sdcli = median([t for side, v in by_side.items() if side.startswith("sdcli") for t in v])
        rows.append(Row(key, sdcli, min(medians.values()), extra=medians, samples=by_side))
    return rows


if __name__ == "__main__":
    main()
