"""The command line: parse options, call the core, report. Heavy imports (torch) happen inside commands."""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from sdcli import __version__
from sdcli.errors import SdcliError
from sdcli.request import DEFAULTS

RANDOM_SEED = -1

EXAMPLES = """\
Examples:

  sdcli txt2img "a sunset over mountains" --cfg 7.5

  sdcli txt2img "a cat in a hat" -n "blurry" --sampler "Euler a" --steps 30 --seed 42 -o cat.png

  sdcli img2img "an oil painting of a harbour" --init photo.jpg --strength 0.6 -o painting.png

  sdcli inpaint "a red door" --init house.png --mask door-mask.png -m sd15-inpaint -o house-red-door.png

  sdcli download sd15
"""

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion from the command line.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def reports_errors(command):
    """Turn SdcliError into one line on stderr and its exit code (1, or 2 for bad usage); Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SdcliError as e:
            _stderr(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C outside sampling (loading, downloading): no traceback
            _stderr("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _print_samplers(as_json: bool) -> None:
    from sdcli.sampler_names import SAMPLERS

    if not as_json:
        typer.echo(f"{'name':<26} {'A1111 name':<26} {'schedule':<12} kind")
    for spec in SAMPLERS.values():
        if as_json:
            record = {
                "name": spec.name, "a1111_name": spec.display_name, "schedule": spec.schedule,
                "stochastic": spec.stochastic, "calls_per_step": spec.calls_per_step, "kind": spec.description,
            }  # fmt: skip
            typer.echo(json.dumps(record))
        else:
            typer.echo(f"{spec.name:<26} {spec.display_name:<26} {spec.schedule:<12} {spec.description}")


def _sampler_option(ctx: typer.Context, value: str) -> str:
    """`--sampler list` prints the samplers and exits, as `sdcli samplers` does."""
    if value is not None and value.strip().lower() == "list" and not ctx.resilient_parsing:
        _print_samplers(as_json=False)
        raise typer.Exit()
    return value


def _seed_option(value: int | None) -> int | None:
    """-1 means a random seed, as in AUTOMATIC1111 and stable-diffusion.cpp."""
    if value == RANDOM_SEED:
        return None
    if value is not None and value < 0:
        raise typer.BadParameter(f"a seed is 0 or more, or {RANDOM_SEED} for a random one; got {value}")
    return value


def _complete_sampler(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for --sampler: our names (no spaces to quote), with A1111's name as help."""
    from sdcli.sampler_names import SAMPLERS

    names = [(spec.name, spec.display_name) for spec in SAMPLERS.values()] + [("list", "print every sampler")]
    return [(name, help_text) for name, help_text in names if name.startswith(incomplete.lower())]


def _complete_model(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion for --model: the models in the weights folder by name, or .safetensors paths.

    Runs on every Tab press, so it reads only a directory listing (no torch, no hashing) and never raises.
    """
    from sdcli.weights import SUFFIX, list_local_models, weights_dir

    try:
        if incomplete.startswith((".", "/", "~")) or os.sep in incomplete:
            typed = Path(incomplete).expanduser()
            folder, stem = (typed, "") if incomplete.endswith(os.sep) else (typed.parent, typed.name)
            prefix = incomplete[: len(incomplete) - len(stem)]
            return sorted(
                prefix + p.name + (os.sep if p.is_dir() else "")
                for p in folder.iterdir()
                if p.name.startswith(stem) and (p.is_dir() or p.name.endswith(SUFFIX))
            )
        directory = weights_dir(ctx.params.get("weights_dir"))
        return [p.stem for p in list_local_models(directory) if p.stem.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - a completion must never break the user's shell
        return []


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
    """Stable Diffusion from the command line: txt2img, img2img and inpaint with SD 1.x, 2.x and SDXL checkpoints."""


# Options shared by the generating commands.
Prompt = Annotated[str | None, typer.Argument(help="What to draw.", show_default=False)]
Negative = Annotated[
    str | None,
    typer.Option(
        "--negative",
        "--negative-prompt",
        "-n",
        help='What to steer away from. Not given: SDXL uses zero embeddings (as diffusers), others encode "".',
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A .safetensors file, a downloaded model's name, or an alias to download (default sd15).",
        autocompletion=_complete_model,
    ),
]
SIZE_DEFAULT = "[default: the model's size, 512 for SD 1.x; img2img/inpaint: the init image's size]"
Width = Annotated[int | None, typer.Option("--width", "-W", help=f"Image width, a multiple of 8 {SIZE_DEFAULT}.")]
Height = Annotated[int | None, typer.Option("--height", "-H", help=f"Image height, a multiple of 8 {SIZE_DEFAULT}.")]
Steps = Annotated[int, typer.Option(help="Sampling steps.")]
Cfg = Annotated[
    float, typer.Option("--cfg", "--cfg-scale", help="Classifier-free guidance scale; 1 or less disables guidance.")
]
Sampler = Annotated[
    str,
    typer.Option(
        "--sampler",
        "--sampling-method",
        help="Sampler, by our name or A1111's, e.g. 'Euler a', 'DDIM'; `sdcli samplers` (or --sampler list) "
        "lists them all.",
        callback=_sampler_option,
        autocompletion=_complete_sampler,
    ),
]


def _complete_schedule(incomplete: str) -> list[str]:
    from sdcli.schedules import SCHEDULES

    return [name for name in SCHEDULES if name.startswith(incomplete.lower())]


Schedule = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        "--scheduler",
        help="The sampler's grid of noise levels (A1111's 'Schedule type'): normal, karras, exponential, "
        "sgm_uniform, simple, ddim_uniform, beta, trailing, leading, lcm. [default: the sampler's own]",
        autocompletion=_complete_schedule,
        show_default=False,
    ),
]
Vae = Annotated[
    str | None,
    typer.Option(
        "--vae",
        help="Another VAE: a VAE .safetensors file (original or diffusers layout) used instead of the model's, or "
        "TAESD, the tiny autoencoder: taesd (SD 1.x/2.x), taesdxl (SDXL) from the weights folder (`sdcli download "
        "taesd`), or a TAESD .safetensors file.",
        show_default=False,
    ),
]
Preview = Annotated[
    Path | None,
    typer.Option(
        "--preview",
        help="Write the image in progress to this PNG every --preview-every steps (replaced each time); through "
        "TAESD when chosen or downloaded, else a coarse color approximation.",
        show_default=False,
    ),
]
PreviewEvery = Annotated[int, typer.Option("--preview-every", min=1, help="Steps between two --preview images.")]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "-s",
        help="Seed of the first image; image i uses seed+i. -1 or none: random (printed on stderr); "
        "with --from-png, -1 draws a new seed instead of the PNG's.",
        callback=_seed_option,
        show_default=False,
    ),
]
Count = Annotated[int, typer.Option("--n", "--batch-count", "-b", min=1, help="Number of images.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per UNet call (speed and memory; not the count).")]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Output PNG file (numbered when --n > 1).")]
Outdir = Annotated[Path | None, typer.Option(help="Output folder [default: ./outputs].")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing files instead of adding -1, -2...")]
SkipExisting = Annotated[
    bool,
    typer.Option(
        "--skip-existing",
        help="Skip each image whose file exists with the same PNG parameters: re-run a stopped run to finish it.",
    ),
]
ClipSkip = Annotated[int, typer.Option(min=1, help="1 = last CLIP layer, 2 = the one before it (A1111).")]
Rng = Annotated[
    Literal["cpu", "cuda"],
    typer.Option(
        help="Every noise of an image as torch draws it for the seed on the CPU, or on an NVIDIA GPU (A1111's default)."
    ),
]
EmbeddingsDir = Annotated[
    Path | None,
    typer.Option(help="Textual-inversion embeddings (.safetensors) [default: embeddings/ in the weights folder]."),
]
ShowTokens = Annotated[
    bool, typer.Option("--show-tokens", help="Print on stderr how each prompt is read: chunks, tokens, weights.")
]
ClipSkip = Annotated[
    int,
    typer.Option(min=1, help="1 = the model's usual text encoder layer, 2 = the one before it (A1111)."),
]
PredictionType = Annotated[
    Literal["eps", "v"] | None,
    typer.Option(
        "--prediction",
        help="What the UNet predicts, for files that do not say [default: the file's v_pred key, NAME.yaml "
        "beside it, SD 2.x's heuristic, else eps].",
        show_default=False,
    ),
]
OriginalSize = Annotated[
    str | None,
    typer.Option("--original-size", help="SDXL: the original image size WxH it conditions on [default: the size]."),
]
Crop = Annotated[str | None, typer.Option("--crop", help="SDXL: the crop's top-left corner X,Y [default: 0,0].")]
AestheticScore = Annotated[
    float | None,
    typer.Option(
        "--aesthetic-score",
        help=f"SDXL refiner: the aesthetic score (0-10) it conditions on [default: {DEFAULTS.aesthetic_score:g}].",
        show_default=False,
    ),
]
NegativeAestheticScore = Annotated[
    float | None,
    typer.Option(
        "--negative-aesthetic-score",
        help=f"SDXL refiner: the negative prompt's aesthetic score [default: {DEFAULTS.negative_aesthetic_score:g}].",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")]
Dtype = Annotated[
    str, typer.Option(help="auto (fp16 on GPUs, bf16 on CPUs with native bf16, else fp32), fp16, bf16, fp32.")
]
LowMemory = Annotated[
    bool, typer.Option("--low-memory", help="Keep networks on the CPU; each visits the GPU only while it works.")
]
VaeTiling = Annotated[
    bool | None,
    typer.Option(
        "--vae-tiling/--no-vae-tiling",
        help="Encode and decode in tiles (less memory). Default: when free memory is short, or after running out.",
        show_default=False,
    ),
]
Compile = Annotated[
    bool, typer.Option("--compile", help="torch.compile the UNet (slow first image; worth it for long batches).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors on stderr (no progress, no summary).")]
ProgressMode = Annotated[
    Literal["auto", "bar", "plain", "json", "none"],
    typer.Option(
        "--progress",
        help="On stderr: bar (rich progress), plain (a line per image, and every few seconds while slow), json "
        "(one JSON object per step and stage, for front-ends), none (only the final summary). auto: bar on a "
        "terminal, else plain.",
    ),
]
WeightsDir = Annotated[
    Path | None, typer.Option(help="Where models live [default: $SDCLI_WEIGHTS_DIR, else see `sdcli models`].")
]
Offline = Annotated[bool, typer.Option("--offline", help="Never download (also HF_HUB_OFFLINE=1).")]
Token = Annotated[str | None, typer.Option(help="Hugging Face token for gated models [default: $HF_TOKEN].")]
Init = Annotated[Path | None, typer.Option("--init", "-i", help="The image to start from (any format Pillow reads).")]
PromptFile = Annotated[
    str | None,
    typer.Option(help="Prompts, one per line, or JSON Lines with per-job settings; '-' reads stdin."),
]
FromPng = Annotated[
    Path | None, typer.Option(help="Make the image a PNG's parameters describe again; options given override them.")
]
Name = Annotated[
    str | None,
    typer.Option(
        help="File name template in --outdir, e.g. '{index:04d}-{seed}-{prompt:.40}'; fields: index, seed, prompt, "
        "sampler, steps, cfg, width, height, model, date, time. [default: {index:05d}-{seed}]"
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object per written image on stdout.")]
MaxImages = Annotated[int, typer.Option(min=1, help="Refuse a run (or job) of more images than this.")]
FailFast = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad prompt-file line or failed job.")]
Lora = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        help="Merge a LoRA (.safetensors) into the model, at WEIGHT (default 1); repeatable. Prompts can also "
        "ask for one by name: <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>.",
        metavar="FILE[:WEIGHT]",
        show_default=False,
    ),
]
LoraDir = Annotated[
    Path | None,
    typer.Option(help="Where <lora:NAME:...> finds NAME.safetensors [default: loras/ in the weights folder]."),
]
LoraIgnoreUnknown = Annotated[
    bool,
    typer.Option("--lora-ignore-unknown", help="Skip LoRA tensors that match nothing in the model (else an error)."),
]
Resize = Annotated[
    Literal["crop", "fit", "stretch"],
    typer.Option(help="Fitting the init image to the size: crop (cover, centre-crop), fit (pad), stretch."),
]


@app.command(epilog=EXAMPLES)
@reports_errors
def txt2img(
    ctx: typer.Context,
    prompt: Prompt = None,
    from_png: FromPng = None,
    negative: Negative = None,
    model: Model = None,
    width: Width = None,
    height: Height = None,
    steps: Steps = DEFAULTS.steps,
    cfg: Cfg = DEFAULTS.cfg,
    sampler: Sampler = DEFAULTS.sampler,
    schedule: Schedule = None,
    seed: Seed = None,
    n: Count = DEFAULTS.n,
    batch_size: BatchSize = DEFAULTS.batch_size,
    prompt_file: PromptFile = None,
    output: Output = None,
    outdir: Outdir = None,
    name: Name = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    clip_skip: ClipSkip = DEFAULTS.clip_skip,
    rng: Rng = DEFAULTS.rng,
    embeddings_dir: EmbeddingsDir = None,
    show_tokens: ShowTokens = False,
    prediction: PredictionType = None,
    original_size: OriginalSize = None,
    crop: Crop = None,
    aesthetic_score: AestheticScore = None,
    negative_aesthetic_score: NegativeAestheticScore = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    low_memory: LowMemory = False,
    lora: Lora = None,
    lora_dir: LoraDir = None,
    lora_ignore_unknown: LoraIgnoreUnknown = False,
    vae: Vae = None,
    vae_tiling: VaeTiling = None,
    preview: Preview = None,
    preview_every: PreviewEvery = DEFAULTS.preview_every,
    compile_unet: Compile = False,
    weights_dir: WeightsDir = None,
    offline: Offline = False,
    token: Token = None,
    as_json: Json = False,
    fail_fast: FailFast = False,
    max_images: MaxImages = DEFAULTS.max_images,
    quiet: Quiet = False,
    progress: ProgressMode = "auto",
) -> None:
    """Generate images from a text prompt (or from each line of a prompt file)."""
    _generate("txt2img", locals())


@app.command(epilog=EXAMPLES)
@reports_errors
def img2img(
    ctx: typer.Context,
    prompt: Prompt = None,
    init: Init = None,
    strength: Annotated[
        float, typer.Option(help="How much to change: 0 keeps the image, 1 ignores it.")
    ] = DEFAULTS.img2img_strength,
    resize: Resize = DEFAULTS.resize,
    negative: Negative = None,
    model: Model = None,
    width: Width = None,
    height: Height = None,
    steps: Steps = DEFAULTS.steps,
    cfg: Cfg = DEFAULTS.cfg,
    sampler: Sampler = DEFAULTS.sampler,
    schedule: Schedule = None,
    seed: Seed = None,
    n: Count = DEFAULTS.n,
    batch_size: BatchSize = DEFAULTS.batch_size,
    prompt_file: PromptFile = None,
    output: Output = None,
    outdir: Outdir = None,
    name: Name = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    clip_skip: ClipSkip = DEFAULTS.clip_skip,
    rng: Rng = DEFAULTS.rng,
    embeddings_dir: EmbeddingsDir = None,
    show_tokens: ShowTokens = False,
    prediction: PredictionType = None,
    original_size: OriginalSize = None,
    crop: Crop = None,
    aesthetic_score: AestheticScore = None,
    negative_aesthetic_score: NegativeAestheticScore = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    low_memory: LowMemory = False,
    lora: Lora = None,
    lora_dir: LoraDir = None,
    lora_ignore_unknown: LoraIgnoreUnknown = False,
    vae: Vae = None,
    vae_tiling: VaeTiling = None,
    preview: Preview = None,
    preview_every: PreviewEvery = DEFAULTS.preview_every,
    compile_unet: Compile = False,
    weights_dir: WeightsDir = None,
    offline: Offline = False,
    token: Token = None,
    as_json: Json = False,
    fail_fast: FailFast = False,
    max_images: MaxImages = DEFAULTS.max_images,
    quiet: Quiet = False,
    progress: ProgressMode = "auto",
) -> None:
    """Redraw an image guided by a prompt. Without --width/--height the size is the image's (rounded to 8)."""
    _generate("img2img", locals())


@app.command(epilog=EXAMPLES)
@reports_errors
def inpaint(
    ctx: typer.Context,
    prompt: Prompt = None,
    init: Init = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="White (or opaque) = repaint, black = keep.")] = None,
    strength: Annotated[float, typer.Option(help="How much to change inside the mask.")] = DEFAULTS.inpaint_strength,
    mask_blur: Annotated[
        int, typer.Option(min=0, help="Feather the mask edge by this many pixels.")
    ] = DEFAULTS.mask_blur,
    invert_mask: Annotated[
        bool, typer.Option("--invert-mask", help="Repaint the black area instead.")
    ] = DEFAULTS.invert_mask,
    resize: Resize = DEFAULTS.resize,
    negative: Negative = None,
    model: Model = None,
    width: Width = None,
    height: Height = None,
    steps: Steps = DEFAULTS.steps,
    cfg: Cfg = DEFAULTS.cfg,
    sampler: Sampler = DEFAULTS.sampler,
    schedule: Schedule = None,
    seed: Seed = None,
    n: Count = DEFAULTS.n,
    batch_size: BatchSize = DEFAULTS.batch_size,
    prompt_file: PromptFile = None,
    output: Output = None,
    outdir: Outdir = None,
    name: Name = None,
    overwrite: Overwrite = False,
    skip_existing: SkipExisting = False,
    clip_skip: ClipSkip = DEFAULTS.clip_skip,
    rng: Rng = DEFAULTS.rng,
    embeddings_dir: EmbeddingsDir = None,
    show_tokens: ShowTokens = False,
    prediction: PredictionType = None,
    original_size: OriginalSize = None,
    crop: Crop = None,
    aesthetic_score: AestheticScore = None,
    negative_aesthetic_score: NegativeAestheticScore = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    low_memory: LowMemory = False,
    lora: Lora = None,
    lora_dir: LoraDir = None,
    lora_ignore_unknown: LoraIgnoreUnknown = False,
    vae: Vae = None,
    vae_tiling: VaeTiling = None,
    preview: Preview = None,
    preview_every: PreviewEvery = DEFAULTS.preview_every,
    compile_unet: Compile = False,
    weights_dir: WeightsDir = None,
    offline: Offline = False,
    token: Token = None,
    as_json: Json = False,
    fail_fast: FailFast = False,
    max_images: MaxImages = DEFAULTS.max_images,
    quiet: Quiet = False,
    progress: ProgressMode = "auto",
) -> None:
    """Repaint the masked part of an image. Inpainting checkpoints (9-channel UNet) are used as such."""
    _generate("inpaint", locals())


def _generate(command: str, opts: dict) -> None:
    from sdcli.cli_generate import generate_command

    opts["json"] = opts.pop("as_json")
    ctx = opts.pop("ctx")
    # Which options were typed: with --from-png those override the PNG's values, the rest do not.
    opts["given"] = {name for name in opts if name in ctx.params and ctx.get_parameter_source(name).name != "DEFAULT"}
    if opts.get("from_png") is not None and "seed" in opts["given"] and opts["seed"] is None:
        opts["seed"] = secrets.randbelow(2**31)  # --seed -1 asks for a new seed, not the PNG's
        if not opts["quiet"]:
            _stderr(f"seed: {opts['seed']}")
    code = generate_command(command, opts)
    if code:
        raise typer.Exit(code)


@app.command()
@reports_errors
def download(
    name: Annotated[
        str | None,
        typer.Argument(help="An alias (see --list), OWNER/REPO/FILE.safetensors, or an https:// URL. Default: sd15."),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the known aliases and exit.")] = False,
    weights_dir: WeightsDir = None,
    token: Token = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the file (checked after download).")] = None,
) -> None:
    """Download a model into the weights folder (verified, resumable). Prints the file's path."""
    from sdcli import download as downloads
    from sdcli.weights import find_local_model
    from sdcli.weights import weights_dir as resolve_weights_dir

    directory = resolve_weights_dir(weights_dir)
    if list_:
        for entry in downloads.REGISTRY.values():
            here = "downloaded" if find_local_model(entry.name, directory) else ""
            default = " (default)" if entry.name == downloads.DEFAULT_MODEL else ""
            typer.echo(f"{entry.name + default:<22} {entry.description:<62} {here}".rstrip())
            typer.echo(f"{'':<22} {entry.url}")
        return
    path = downloads.download(name or downloads.DEFAULT_MODEL, directory, token=token, sha256=sha256)
    typer.echo(str(path))


@app.command()
@reports_errors
def models(
    weights_dir: WeightsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model on stdout.")] = False,
) -> None:
    """List the models in the weights folder: name, family, prediction (eps/v), size, dtype and short hash.

    A file that cannot be read is listed as unreadable, with the reason; the listing goes on.
    """
    from sdcli.errors import CheckpointError
    from sdcli.families import detect
    from sdcli.header import read_header
    from sdcli.prediction import family_with_prediction
    from sdcli.weights import list_local_models, require_weights_dir, short_hash
    from sdcli.weights import weights_dir as resolve_weights_dir

    directory = require_weights_dir(resolve_weights_dir(weights_dir))
    if not as_json:
        _stderr(f"weights folder: {directory}")
    for path in list_local_models(directory):
        info: dict = {"name": path.stem, "path": str(path), "size": None, "family": "unreadable", "dtype": "?"}
        try:
            info["size"] = path.stat().st_size
            header = read_header(path)
        except (CheckpointError, OSError) as e:
            info["error"] = str(e).removeprefix(f"{path}: ") if isinstance(e, CheckpointError) else e.strerror
        else:
            dtypes = sorted({v.dtype for k, v in header.items() if k.startswith("model.diffusion_model.")})
            info["dtype"] = "/".join(dtypes) or "?"
            try:
                family = detect({k: v.shape for k, v in header.items()})
                family, prediction = family_with_prediction(path, header, family)
                info.update(family=family.name, prediction=prediction.kind, prediction_source=prediction.source)
            except CheckpointError as e:
                info.update(family="unknown", error=str(e))
        try:
            info["hash"] = short_hash(path)
        except OSError as e:
            info["hash"] = None
            info.setdefault("error", e.strerror or str(e))
        if as_json:
            typer.echo(json.dumps(info))
        else:
            size = "?" if info["size"] is None else f"{info['size'] / 1e9:.2f} GB"
            predicts = info.get("prediction", "?")
            line = f"{info['name']:<40} {info['family']:<12} {predicts:<4} {size:>9} {info['dtype']:<6} "
            line += info["hash"] or "-"
            typer.echo(line + (f"  ({info['error']})" if "error" in info else ""))


@app.command()
@reports_errors
def tokens(
    prompt: Annotated[str, typer.Argument(help="The prompt to read.", show_default=False)],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="A model file or downloaded model's name [default: SD 1.x].")
    ] = None,
    steps: Steps = DEFAULTS.steps,
    embeddings_dir: EmbeddingsDir = None,
    weights_dir: WeightsDir = None,
) -> None:
    """Show how a prompt is read: its 75-token chunks, each token's weight, embeddings, and edits by step."""
    from sdcli.cli_generate import tokens_command

    tokens_command(prompt, model, steps, embeddings_dir, weights_dir)


@app.command()
def samplers(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sampler on stdout.")] = False,
) -> None:
    """List the samplers: our name, AUTOMATIC1111's name, the schedule and what kind of sampler it is."""
    _print_samplers(as_json)


def main() -> None:
    app()


@app.command()
@reports_errors
def serve(
    model: Model = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback needs --api-auth or --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 7860,
    queue: Annotated[int, typer.Option("--queue", min=1, help="Requests that may wait behind the one running.")] = 4,
    api_auth: Annotated[
        str | None,
        typer.Option(
            "--api-auth", envvar="SDCLI_API_AUTH", help="HTTP basic credentials: user:password[,user2:password2]."
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="SDCLI_API_TOKEN", help="Accept `Authorization: Bearer TOKEN`.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow listening beyond loopback without authentication.")
    ] = False,
    max_pixels: Annotated[
        int, typer.Option(min=4096, help="Largest image (width x height) a request may ask for.")
    ] = 1024 * 1024,
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes.")] = 50 * 1024 * 1024,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object per request.")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    weights_dir: WeightsDir = None,
    lora_dir: LoraDir = None,
    embeddings_dir: EmbeddingsDir = None,
) -> None:
    """Keep a model loaded behind AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, ...)."""
    from sdcli.errors import UsageError

    users = {}
    for pair in (api_auth or "").split(","):
        if pair.strip():
            user, sep, password = pair.strip().partition(":")
            if not sep or not user or not password:
                raise UsageError("--api-auth takes user:password pairs separated by commas")
            users[user] = password
    if token is not None and not token.strip():
        raise UsageError("--token must not be empty")
    if not (users or token or insecure or _is_loopback(host)):
        raise UsageError(
            f"--host {host} listens beyond this machine: protect it with --api-auth or --token (or pass --insecure)"
        )
    try:
        from sdcli.server import serve_forever
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise SdcliError(f"sdcli serve needs {error.name}: pip install 'sdcli[serve]'") from None

    serve_forever(
        model, host=host, port=port, queue=queue, users=users, token=token, max_pixels=max_pixels,
        max_body=max_body, log_json=log_json, device=device, dtype=dtype, weights_dir=weights_dir,
        lora_dir=lora_dir, embeddings_dir=embeddings_dir,
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
