"""Few-step images, whole process, sdcli against diffusers on the same random weights (`make bench`).

Each job runs in its own process, as a user runs it: sdcli through its command line (bench/cli_job.py),
diffusers through `StableDiffusionPipeline.from_single_file` (bench/diffusers_job.py). Wall time counts
everything from the interpreter's start (imports, model load, sampling, decode, PNG writing); peak RSS is
each process's own. Sides alternate (ABBA) over the repeats, after one small untimed run of each side per
checkpoint that warms the page cache and sdcli's hash cache (a user's second run).

Jobs, on random full-size checkpoints built once into bench/.cache (random_models.py):
- SD-Turbo-shaped: the SD 2.x UNet and OpenCLIP ViT-H at 512x512, 1 step, no guidance (sdcli `--cfg 1`,
  diffusers `guidance_scale=0` as its model card), Euler ancestral on "trailing" timesteps as SD-Turbo's
  scheduler config; decoded by a random TAESD (`--vae FILE`; diffusers `AutoencoderTiny`) and by the full VAE;
  then a batch of 8 such images with TAESD (one UNet call of 8: seconds per image, load included).
- LCM: SD 1.5-shaped, 4 steps, `--sampler lcm --cfg 1` against diffusers' `LCMScheduler` (its own
  timesteps 999, 759, 499, 259), with TAESD and with the full VAE.
Targets (issue "Fast images"): the 1-step 512x512 image with TAESD in <= 10 s wall, the batch of 8 at
<= 3 s per image, both at a ratio sdcli/diffusers <= 0.7.

    .venv/bin/python bench/fast.py            # 512x512, batch 8, 2 repeats
    .venv/bin/python bench/fast.py --quick    # 256x256, batch 2, 1 repeat: checks that every job runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from random_models import ensure_checkpoint, ensure_diffusers_config, ensure_taesd  # noqa: E402
from run import Row, format_table  # noqa: E402
from timing import machine_description, median, run_child  # noqa: E402

from sdcli.devices import cpu_has_native_bf16  # noqa: E402
from sdcli.families import SD1, SD2, Family  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"  # job.py's, which diffusers_job.py uses
WALL_TARGET_S, PER_IMAGE_TARGET_S, RATIO_TARGET = 10.0, 3.0, 0.7


@dataclass(frozen=True)
class Job:
    """A few-step job: the family whose shapes it has, and each side's settings for the same sampling."""

    family: Family
    steps: int
    sdcli_args: tuple[str, ...]
    scheduler: str  # diffusers_job.py --scheduler
    guidance_scale: float  # diffusers' (0 and 1 both mean no guidance there)


JOBS = {
    "SD-Turbo-shaped": Job(
        SD2, 1, ("--sampler", "euler_a", "--schedule", "trailing", "--cfg", "1", "--prediction", "eps"),
        "euler_a_trailing", 0.0,
    ),
    "LCM SD1.5-shaped": Job(SD1, 4, ("--sampler", "lcm", "--cfg", "1"), "lcm", 1.0),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    job: str  # a JOBS key
    taesd: bool
    batch: int = 1

    def label(self, size: int) -> str:
        job = JOBS[self.job]
        what = f"{self.job} {size}x{size} {job.steps}-step, {'TAESD' if self.taesd else 'full VAE'}"
        return what + (f", batch of {self.batch}" if self.batch > 1 else "")


def main() -> None:
    args = parse_args()
    print("\n".join(machine_description(args.threads or os.cpu_count())), flush=True)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cpu_has_native_bf16() else "fp32")
    print(f"dtype: {dtype} (both sides)", flush=True)
    started = time.perf_counter()
    taesd = ensure_taesd(args.cache)
    files = {}
    for name, job in JOBS.items():
        files[name] = ensure_checkpoint(args.cache, job.family), ensure_diffusers_config(args.cache, job.family)
        print(f"{name}: {files[name][0]} ({files[name][0].stat().st_size / 1e9:.2f} GB, fp16, random)", flush=True)
    size, batch = (256, 2) if args.quick else (512, args.batch)
    cases = [
        Case("SD-Turbo-shaped", taesd=True),
        Case("SD-Turbo-shaped", taesd=False),
        Case("SD-Turbo-shaped", taesd=True, batch=batch),
        Case("LCM SD1.5-shaped", taesd=True),
        Case("LCM SD1.5-shaped", taesd=False),
    ]
    runner = Runner(args, dtype, taesd, files)
    for name in JOBS:  # warm-up: page cache, sdcli's hash cache, Python's bytecode caches
        for side in ("sdcli", "diffusers"):
            runner.run(side, Case(name, taesd=True), size=64)
    rows, reports, differences = [], {}, []
    for case in cases:
        results: dict[str, list[dict]] = {"sdcli": [], "diffusers": []}
        for i in range(args.repeats):
            for side in ("sdcli", "diffusers") if i % 2 == 0 else ("diffusers", "sdcli"):
                results[side].append(runner.run(side, case, size))
        print(f"  {case.label(size)}: done", flush=True)
        reports[case.label(size)] = results
        rows += case_rows(case, size, results)
        differences.append(f"{case.label(size)}: {runner.first_image_difference(case):.2f}")

    print("\n" + format_table(rows))
    print("\nThe same job on both sides: mean absolute difference of the first images (0-255; the same initial")
    print("noise, different arithmetic; ancestral and LCM noise after it may differ):\n  " + "\n  ".join(differences))
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": reports}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256, batch of 2, 1 repeat")
    parser.add_argument("--repeats", type=int, help="whole-job runs per side and case (default 2, quick 1)")
    parser.add_argument("--batch", type=int, default=8, help="images of the batch case (default 8)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: as sdcli's")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both sides (default: all cores)")
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache", help="where the checkpoints are built")
    parser.add_argument("--json", type=Path, help="also write the rows and every run's report as JSON here")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    return args


class Runner:
    """Runs one side of a case in a child process and returns its report, with the parent-measured wall time."""

    def __init__(self, args: argparse.Namespace, dtype: str, taesd: Path, files: dict[str, tuple[Path, Path]]):
        self.dtype, self.taesd, self.files = dtype, taesd, files
        self.out = args.cache / "fast-jobs"
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            # sdcli's weights folder and hash cache inside the bench cache, never the user's
            "SDCLI_WEIGHTS_DIR": str(args.cache / "sdcli-weights"),
            "SDCLI_CACHE_DIR": str(args.cache / "sdcli-cache"),
        }
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)

    def output(self, side: str, case: Case) -> Path:
        return self.out / f"{side}-{case.job.split()[0]}-{'taesd' if case.taesd else 'vae'}-{case.batch}.png"

    def first_image_difference(self, case: Case) -> float:
        """Mean absolute difference (0-255) between the first images the two sides wrote for `case`."""
        import numpy as np
        from PIL import Image

        def first(side: str) -> np.ndarray:
            out = self.output(side, case)
            path = out if out.exists() else sorted(out.parent.glob(f"{out.stem}-*.png"))[0]  # a batch's first
            return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

        return float(np.abs(first("sdcli") - first("diffusers")).mean())

    def run(self, side: str, case: Case, size: int) -> dict:
        job = JOBS[case.job]
        checkpoint, config = self.files[case.job]
        out = self.output(side, case)
        if side == "sdcli":
            cmd = [
                sys.executable, str(BENCH / "cli_job.py"), "txt2img", PROMPT, "-m", str(checkpoint),
                "-W", str(size), "-H", str(size), "--steps", str(job.steps), "--seed", "0", "--dtype", self.dtype,
                "--device", "cpu", "--offline", "--quiet", "--overwrite", "-o", str(out),
                "-b", str(case.batch), "--batch-size", str(case.batch), *job.sdcli_args,
            ]  # fmt: skip
            if case.taesd:
                cmd += ["--vae", str(self.taesd / "diffusion_pytorch_model.safetensors")]
        else:
            cmd = [
                sys.executable, str(BENCH / "diffusers_job.py"), "--checkpoint", str(checkpoint),
                "--config", str(config), "--scheduler", job.scheduler, "--dtype", self.dtype, "--size", str(size),
                "--steps", str(job.steps), "--cfg", str(job.guidance_scale), "--batch", str(case.batch),
                "--out", str(out),
            ]  # fmt: skip
            if case.taesd:
                cmd += ["--taesd", str(self.taesd)]
        stdout, wall, _ = run_child(cmd, env=self.env)  # peak RSS: the child's own VmHWM (see job.py)
        report = json.loads(stdout.strip().splitlines()[-1])
        if report.get("exit_code", 0) != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {report['exit_code']}")
        return {**report, "wall_s": wall}


def case_rows(case: Case, size: int, results: dict[str, list[dict]]) -> list[Row]:
    """Wall time (per image for a batch) and peak RSS of one case, with the issue's targets where it sets them."""
    med = {side: {k: median([r[k] for r in runs]) for k in ("wall_s", "peak_rss_gb")} for side, runs in results.items()}
    label = case.label(size)
    per = case.batch
    wall = Row(
        f"{label}: wall{' per image' if per > 1 else ''}, load included",
        med["sdcli"]["wall_s"] / per,
        med["diffusers"]["wall_s"] / per,
        samples={side: [r["wall_s"] for r in runs] for side, runs in results.items()},
    )
    full_size = size == 512 and case.job == "SD-Turbo-shaped" and case.taesd
    if full_size and per == 1:
        wall.target = f"<= {WALL_TARGET_S:g} s, ratio <= {RATIO_TARGET}"
        wall.met = wall.sdcli <= WALL_TARGET_S and wall.ratio <= RATIO_TARGET
    elif full_size and per == 8:
        wall.target = f"<= {PER_IMAGE_TARGET_S:g} s/image, ratio <= {RATIO_TARGET}"
        wall.met = wall.sdcli <= PER_IMAGE_TARGET_S and wall.ratio <= RATIO_TARGET
    rss = Row(f"{label}: peak RSS", med["sdcli"]["peak_rss_gb"], med["diffusers"]["peak_rss_gb"], unit="GB")
    return [wall, rss]


if __name__ == "__main__":
    main()
