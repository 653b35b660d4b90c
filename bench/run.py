"""Benchmark sdcli against diffusers on one random-weight full-size SD 1.5 checkpoint (`make bench`).

Both sides load the same fp16 single-file checkpoint (built once into bench/.cache/), run with the
same threads and dtype, and are timed alternately (ABBA rounds) after a warm-up; the table shows
medians and the ratio sdcli/diffusers (below 1: sdcli is faster or leaner). diffusers is timed with
its networks in the default layout and in channels_last, and its better time is the baseline; sdcli is
timed as it ships (channels_last on the CPU), against each.

Whole jobs (load time, peak RSS) run in separate processes (bench/job.py). The bf16 network rows run only
on CPUs with native bf16 (AMX-BF16 / AVX512-BF16) unless `--bf16 on`: elsewhere oneDNN emulates it, about
10x slower than fp32 in channels_last (and 100-300x in the default layout). The whole bf16 job always runs,
with one step where bf16 is emulated, because its peak memory is a target of its own.

    .venv/bin/python bench/run.py            # full run: 256 and 512, fp32 (+ bf16 where native)
    .venv/bin/python bench/run.py --quick    # a few minutes: 256x256 only, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from random_models import ensure_checkpoint, ensure_diffusers_config  # noqa: E402
from timing import alternate, machine_description, median, run_child  # noqa: E402

from sdcli.devices import cpu_has_native_bf16  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Targets on this CPU class: the largest ratio sdcli/diffusers by network and dtype, and limits.
UNET_TARGET = {"fp32": 1.0, "bf16": 0.7}
VAE_TARGET = {"bf16": 1.0}
LOAD_TARGET_S, RSS_TARGET_GB, HELP_TARGET_S = 3.0, 3.0, 0.3


@dataclass
class Row:
    """One line of the results table. Times in seconds; memory in GB."""

    name: str
    sdcli: float | None
    diffusers: float | None
    unit: str = "s"
    target: str = ""
    met: bool | None = None
    extra: dict[str, float] = field(default_factory=dict)  # medians of diffusers' layouts
    samples: dict[str, list[float]] = field(default_factory=dict)  # every timed run, for the JSON
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.sdcli / self.diffusers if self.sdcli and self.diffusers else None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(machine_description(args.threads)), flush=True)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print("warning: the machine is busy (load average above 0.5); timings will be noisy", flush=True)
    started = time.perf_counter()
    checkpoint = ensure_checkpoint(args.cache)
    config = ensure_diffusers_config(args.cache)
    print(f"checkpoint: {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB, fp16, random weights)", flush=True)

    bf16 = {"on": True, "off": False, "auto": cpu_has_native_bf16()}[args.bf16]
    compute_dtypes = ["fp32", "bf16"] if bf16 else ["fp32"]
    sizes = [256] if args.quick else [256, 512]
    vae_size = 256 if args.quick else 512
    rows: list[Row] = []
    for name in compute_dtypes:
        rows += bench_networks(checkpoint, config, name, sizes, vae_size, args)
    if not bf16:
        rows.append(bf16_skipped_row())
    try:
        rows += bench_jobs(checkpoint, config, compute_dtypes, args)
    except RuntimeError as e:  # a failed child: keep the numbers measured so far
        print(f"whole-job runs failed: {e}", flush=True)
        rows.append(Row("whole-job runs", None, None, unit="-", note="failed; see the log above"))
    rows.append(bench_help(args.repeats + 2))

    table = format_table(rows)
    print("\n" + table)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"\ntotal bench time {time.perf_counter() - started:.0f} s; load average at the end {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f} (this bench alone makes about {args.threads})"
    )
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256 only, fewer repeats (a few minutes)")
    parser.add_argument("--repeats", type=int, help="timed rounds per benchmark (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="auto: only with native bf16")
    parser.add_argument("--job-steps", type=int, help="sampling steps of the whole-job runs (default 2, quick 1)")
    parser.add_argument("--job-repeats", type=int, default=1, help="whole-job runs per side")
    parser.add_argument("--no-channels-last", action="store_true", help="skip diffusers' channels_last variant")
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache", help="where the checkpoint is built")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.job_steps is None:
        args.job_steps = 1 if args.quick else 2
    return args


def load_both(checkpoint: Path, config: Path, dtype: torch.dtype):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from sdcli.checkpoint import load_model

    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    model = load_model(checkpoint, device="cpu", dtype=dtype)
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(config),
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


@torch.inference_mode()
def bench_networks(
    checkpoint: Path, config: Path, dtype_name: str, sizes: list[int], vae_size: int, args: argparse.Namespace
) -> list[Row]:
    """UNet step (CFG batch 2) per size, VAE decode and text encoding, both sides in one process."""
    from sdcli.pipeline import decode_latents, encode_prompts

    dtype = DTYPES[dtype_name]
    model, pipe = load_both(checkpoint, config, dtype)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.full((2,), 500.0)
    latents = {s: torch.randn(2, 4, s // 8, s // 8, generator=g).to(dtype) for s in sizes}
    decode_in = torch.randn(1, 4, vae_size // 8, vae_size // 8, generator=g).to(dtype)
    scale = pipe.vae.config.scaling_factor

    # sdcli runs as it ships in both passes (its times are pooled); diffusers in its default layout, then in
    # channels_last.
    def unet_fns(size: int, suffix: str) -> dict:
        x = latents[size]
        return {
            "sdcli" + suffix: lambda: model.unet(x, t, context),
            "diffusers" + suffix: lambda: pipe.unet(x, t, encoder_hidden_states=context).sample,
        }

    def vae_fns(suffix: str) -> dict:
        return {
            "sdcli" + suffix: lambda: decode_latents(model, decode_in.float() * scale),
            "diffusers" + suffix: lambda: pipe.vae.decode(decode_in / scale).sample,
        }

    formats = ["", "+CL"] if not args.no_channels_last else [""]
    times: dict[str, dict[str, list[float]]] = {}
    for suffix in formats:
        if suffix:
            for net in (pipe.unet, pipe.vae):
                net.to(memory_format=torch.channels_last)
        for size in sizes:
            key = f"UNet step {size}x{size} {dtype_name} (CFG batch 2)"
            times.setdefault(key, {}).update(alternate(unet_fns(size, suffix), args.repeats))
            print(f"  {key} {suffix or 'default layout'}: done", flush=True)
        key = f"VAE decode {vae_size}x{vae_size} {dtype_name}"
        times.setdefault(key, {}).update(alternate(vae_fns(suffix), max(2, args.repeats - 2)))
        print(f"  {key} {suffix or 'default layout'}: done", flush=True)
    text = {
        "sdcli": lambda: (encode_prompts(model, [PROMPT]), encode_prompts(model, [NEGATIVE])),
        "diffusers": lambda: pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE),
    }
    times[f"text encoding (prompt + negative) {dtype_name}"] = alternate(text, args.repeats * 2)

    rows = []
    for key, by_side in times.items():
        medians = {side: median(v) for side, v in by_side.items() if side.startswith("diffusers")}
        sdcli = median([t for side, v in by_side.items() if side.startswith("sdcli") for t in v])
        row = Row(key, sdcli, min(medians.values()), extra=medians, samples=by_side)
        targets = {"UNet": UNET_TARGET, "VAE": VAE_TARGET}.get(key.split()[0], {})
        if (limit := targets.get(dtype_name)) is not None:
            row.target, row.met = f"ratio <= {limit}", row.ratio <= limit
        rows.append(row)
    return rows


def bf16_skipped_row() -> Row:
    """Why bf16 is not measured here, with the evidence: one conv timed in fp32 and in emulated bf16."""
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    x = torch.randn(1, 320, 32, 32)
    seconds = {}
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):
            for name, dtype in DTYPES.items():
                layer, inp = conv.to(dtype, memory_format=layout), x.to(dtype, memory_format=layout)
                layer(inp)  # warm-up: oneDNN builds its kernel
                runs = []
                for _ in range(3):  # the fastest of a few runs: least disturbed by other load
                    start = time.perf_counter()
                    layer(inp)
                    runs.append(time.perf_counter() - start)
                seconds[name, layout] = min(runs)
    default, cl = (seconds["bf16", f] / seconds["fp32", f] for f in (torch.contiguous_format, torch.channels_last))
    return Row(
        "bf16 rows (UNet, VAE)",
        None,
        None,
        unit="-",
        note=f"skipped: no native bf16 on this CPU; a 3x3 conv (320 ch, 32x32) runs {default:.0f}x (NCHW) / "
        f"{cl:.0f}x (channels_last) slower in bf16 than fp32 here (emulated); use --bf16 on to force",
    )


def bench_jobs(checkpoint: Path, config: Path, compute_dtypes: list[str], args: argparse.Namespace) -> list[Row]:
    """Whole txt2img jobs in separate processes, alternating sides: load time and peak RSS.

    Where bf16 compute is emulated (skipped in the network rows), the bf16 job takes one step: enough
    for its peak memory, which every stage (load, sampling, decode) reaches once.
    """
    size = 256 if args.quick else 512
    out = args.cache / "jobs"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype_name in ("fp32", "bf16"):
        steps = args.job_steps if dtype_name in compute_dtypes else 1
        results: dict[str, list[dict]] = {"sdcli": [], "diffusers": []}
        for i in range(args.job_repeats):
            for side in ("sdcli", "diffusers") if i % 2 == 0 else ("diffusers", "sdcli"):
                cmd = [
                    sys.executable, str(BENCH / "job.py"), side, "--checkpoint", str(checkpoint),
                    "--config", str(config), "--dtype", dtype_name, "--size", str(size), "--steps", str(steps),
                    "--threads", str(args.threads), "--out", str(out / f"{side}-{dtype_name}.png"),
                ]  # fmt: skip
                stdout, wall, _ = run_child(cmd)  # the child's own VmHWM, not wait4's (see job.py)
                report = json.loads(stdout.strip().splitlines()[-1])
                results[side].append({**report, "wall_s": wall, "rss_gb": report["peak_rss_gb"]})
        what = f"{size}x{size} {steps}-step job" + ("" if dtype_name in compute_dtypes else ", emulated bf16")
        med = {side: {k: median([r[k] for r in rs]) for k in rs[0]} for side, rs in results.items()}
        print(f"  jobs {dtype_name} ({what}): done", flush=True)
        load = Row(f"load time {dtype_name} ({what})", med["sdcli"]["load_s"], med["diffusers"]["load_s"])
        load.target, load.met = f"<= {LOAD_TARGET_S} s", med["sdcli"]["load_s"] <= LOAD_TARGET_S
        rss = Row(f"peak RSS {dtype_name} ({what})", med["sdcli"]["rss_gb"], med["diffusers"]["rss_gb"], unit="GB")
        if dtype_name == "bf16":
            rss.target, rss.met = f"<= {RSS_TARGET_GB} GB", med["sdcli"]["rss_gb"] <= RSS_TARGET_GB
        wall = Row(f"whole process wall {dtype_name} ({what})", med["sdcli"]["wall_s"], med["diffusers"]["wall_s"])
        rows += [load, rss, wall]
    return rows


def bench_help(repeats: int) -> Row:
    """Wall time of `sdcli --help` (the console script next to this Python, else `python -m sdcli`)."""
    script = Path(sys.executable).parent / "sdcli"
    cmd = [str(script), "--help"] if script.exists() else [sys.executable, "-m", "sdcli", "--help"]
    if not script.exists() and shutil.which("sdcli"):
        cmd = [shutil.which("sdcli"), "--help"]
    times = alternate({"help": lambda: run_child(cmd)}, repeats)["help"]
    row = Row("`sdcli --help` wall time", median(times), None, target=f"<= {HELP_TARGET_S} s")
    row.met = row.sdcli <= HELP_TARGET_S
    return row


def format_table(rows: list[Row]) -> str:
    """A Markdown table: medians, the ratio, what channels_last does for diffusers, the target and whether it is met."""
    lines = [
        "| benchmark | sdcli | diffusers (best) | ratio sdcli/diffusers | diffusers default/CL | target | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.name} | | | | | | {r.note} |")
            continue
        d_default, d_cl = r.extra.get("diffusers"), r.extra.get("diffusers+CL")
        lines.append(
            "| "
            + " | ".join(
                [
                    r.name,
                    _value(r.sdcli, r.unit),
                    _value(r.diffusers, r.unit),
                    f"{r.ratio:.2f}" if r.ratio else "",
                    f"{d_default:.2f} / {d_cl:.2f}" if d_default and d_cl else "",
                    r.target,
                    {True: "yes", False: "**no**", None: ""}[r.met],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return f"{value:.2f} {unit}" if value >= 0.1 or unit != "s" else f"{value * 1000:.0f} ms"


if __name__ == "__main__":
    main()
