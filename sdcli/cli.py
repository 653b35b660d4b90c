"""The command line: parse options, call the core, report. Heavy imports happen inside commands."""

from __future__ import annotations

import contextlib
import functools
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer

from sdcli import __version__
from sdcli.errors import SdcliError, UsageError

TXT2IMG_EXAMPLES = """\
Examples:

  sdcli txt2img "a sunset over mountains" --cfg 7.5

  sdcli txt2img "a cat in a hat" -n "blurry" --sampler "Euler a" --steps 30 --seed 42 -o cat.png

  sdcli txt2img "a lighthouse at night" --n 4 --batch-size 2 --outdir lighthouses -m my-model.safetensors
"""

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion from the command line.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def reports_errors(command):
    """Turn SdcliError into one line on stderr and its exit code (1, or 2 for bad usage)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SdcliError as e:
            _stderr(f"error: {e}")
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Stable Diffusion from the command line: txt2img, with its own networks and samplers."""


ModelOpt = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model file (.safetensors, SD 1.x single-file layout).")
]


@app.command(epilog=TXT2IMG_EXAMPLES)
@reports_errors
def txt2img(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative: Annotated[str, typer.Option("--negative", "-n", help="What to steer away from.")] = "",
    model: ModelOpt = None,
    width: Annotated[int, typer.Option("--width", "-W", help="Image width, a multiple of 8.")] = 512,
    height: Annotated[int, typer.Option("--height", "-H", help="Image height, a multiple of 8.")] = 512,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale; 1 disables guidance.")] = 7.5,
    sampler: Annotated[str, typer.Option(help="Sampler, by our name or A1111's (e.g. 'Euler a').")] = (
        "DPM++ 2M Karras"
    ),
    seed: Annotated[int | None, typer.Option(help="Seed of the first image; image i uses seed+i.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per UNet call.")] = 1,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output PNG file.")] = None,
    outdir: Annotated[Path | None, typer.Option(help="Output folder (default ./outputs).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files instead of adding a suffix.")] = False,
    clip_skip: Annotated[int, typer.Option(min=1, help="1 = last CLIP layer, 2 = the one before (A1111).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPUs, fp32 on CPUs), fp16, bf16 or fp32.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors on stderr.")] = False,
) -> None:
    """Generate images from a text prompt."""
    from sdcli.batch import generate_to_files, output_paths
    from sdcli.pipeline import GenerationRequest

    chosen_seed = secrets.randbelow(2**32 - n) if seed is None else seed
    requests = [
        GenerationRequest(prompt, negative, width, height, steps, cfg, sampler, chosen_seed + i, clip_skip)
        for i in range(n)
    ]
    requests[-1].validate()  # bad numbers fail before a model is loaded
    targets = output_paths(output, outdir, [r.seed for r in requests])
    loaded = _load(model, device, dtype)
    if seed is None and not quiet:
        _stderr(f"seed: {chosen_seed}")
    with _progress(-(-n // batch_size) * steps, quiet) as on_step:
        for path in generate_to_files(
            loaded, requests, targets, batch_size=batch_size, overwrite=overwrite, on_step=on_step
        ):
            typer.echo(str(path))


def _load(model: Path | None, device: str, dtype: str):
    from sdcli.checkpoint import load_model
    from sdcli.devices import resolve_device, resolve_dtype

    if model is None:
        raise UsageError("no model given: pass --model path/to/model.safetensors")
    target = resolve_device(device)
    return load_model(model, device=target, dtype=resolve_dtype(dtype, target))


@contextlib.contextmanager
def _progress(total_steps: int, quiet: bool):
    """A rich progress bar on stderr when it is a terminal; otherwise no progress output at all."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("sampling"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("sampling", total=total_steps, rate="")

        def on_step(_info: dict) -> None:
            progress.advance(task)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.2f} it/s" if speed else "")

        yield on_step


def main() -> None:
    app()
