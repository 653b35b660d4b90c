"""The body shared by txt2img, img2img and inpaint: options -> jobs -> images written, and the report.

Results go to stdout (one path, or one JSON object, per image); seeds, warnings, progress and errors to
stderr. A job that fails is reported with its prompt-file line and the others still run; the exit code
says what happened: 0 all written, 1 something failed, 128 + signal number when stopped by a signal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from sdcli.errors import SdcliError, UsageError

# Options that are per-job settings: a prompt-file line or a PNG's parameters can set them too.
SETTINGS = (
    "prompt", "negative", "width", "height", "steps", "cfg", "sampler", "schedule", "n", "clip_skip",
    "init", "mask", "strength", "mask_blur", "invert_mask", "resize",
)  # fmt: skip


def stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def generate_command(command: str, opts: dict) -> int:
    """Run one generating command with its parsed options; returns the exit code."""
    from sdcli.batch import Interrupted, Planned, Written, job_requests, run
    from sdcli.model_specs import model_defaults
    from sdcli.outputs import Namer, ensure_writable
    from sdcli.progress import progress_report
    from sdcli.request import DEFAULTS, is_random_seed, model_settings, random_seed
    from sdcli.signals import stop_on_signals, stopped_message
    from sdcli.weights import short_hash

    quiet = opts["quiet"]
    report = progress_report(opts["progress"], quiet)
    warn = (lambda message: None) if quiet else (lambda message: stderr(f"warning: {message}"))
    jobs, source, png = _jobs(command, opts)
    failures = 0

    def fail(where: str, message: str) -> None:
        nonlocal failures
        failures += 1
        stderr(f"error: {where}: {message}")

    for line_error in source.errors:
        fail(f"{source.name} line {line_error.line}", line_error.message)
        if opts["fail_fast"]:
            return 1
    # The model's family (read from the file's header, without loading it) gives the default size and
    # the limits a request is checked against, so every job is checked before the weights load.
    model_path = _model_path(opts, png, warn)
    family = _family(model_path)
    if family.is_inpainting and command != "inpaint":
        raise UsageError(f"{model_path.name} is an inpainting model: use `sdcli inpaint` with --init and --mask")
    namer = Namer(opts["output"], opts["outdir"], opts["name"], model_path.stem, overwrite=opts["overwrite"])
    max_images = opts.get("max_images") or DEFAULTS.max_images
    defaults = {k: opts[k] for k in SETTINGS if opts.get(k) is not None}
    # A distilled model's recommended settings replace the defaults of the options not typed.
    recommended = model_defaults(model_path)
    if command != "txt2img":  # img2img and inpaint keep the init image's size
        recommended = {k: v for k, v in recommended.items() if k not in ("width", "height")}
    from_model = model_settings(recommended, opts.get("given", set(opts)))
    defaults.update(from_model)
    run_seed = random_seed() if is_random_seed(opts["seed"]) else opts["seed"]
    run_seed_used = False  # by a job without a seed of its own (or -1)
    accepted = []
    offset = 0

    def job_failed(job, error: SdcliError) -> None:
        if len(jobs) == 1 and job.line is None:
            raise error  # a single command-line job: its error is the command's
        fail(job.where(source.name), str(error))

    for job in jobs:
        values = {**defaults, **job.values}
        try:
            if command != "txt2img" and values.get("init") is None:
                raise UsageError(f'{command} needs an init image: --init IMAGE (or "init" in the prompt file)')
            if command == "inpaint" and values.get("mask") is None:
                raise UsageError('inpaint needs a mask: --mask MASK (or "mask" in the prompt file)')
            own_seed = job.values.get("seed")
            first_seed = run_seed + offset if is_random_seed(own_seed) else own_seed
            requests = job_requests(values, first_seed, warn, family=family, max_images=max_images)
        except SdcliError as e:
            job_failed(job, e)
            if opts["fail_fast"]:
                return 1
            continue
        run_seed_used |= is_random_seed(own_seed)
        offset += len(requests)
        if offset > max_images:
            raise UsageError(f"this run would make more than {max_images} images: split it, or raise --max-images")
        accepted.append((job, values, requests))

    planned: list[Planned] = []
    for job, values, requests in accepted:
        try:
            targets = namer.paths(requests, job.values.get("output"), offset, len(planned))
        except SdcliError as e:
            job_failed(job, e)
            if opts["fail_fast"]:
                return 1
            continue
        planned += [Planned(job, r, t, values) for r, t in zip(requests, targets, strict=True)]
    if not planned:
        return 1
    ensure_writable(p.target.parent for p in planned)
    with report.loading(model_path.name):
        model = _load(model_path, opts, warn)
        taesd = _taesd(model, opts, warn)
    model_hash = short_hash(model_path)
    if run_seed_used and is_random_seed(opts["seed"]) and not quiet:
        stderr(f"seed: {run_seed}")

    dropped = False
    with stop_on_signals() as stopped, report.sampling(planned, opts["batch_size"]) as progress:
        preview = _preview(model, opts, taesd, warn)

        def on_step(info: dict) -> None:
            if stopped():
                raise Interrupted
            progress.step(info)
            if preview is not None:
                preview(info)

        try:
            for result in run(model, planned, batch_size=opts["batch_size"], overwrite=opts["overwrite"],
                              on_step=on_step, should_stop=stopped, vae_tiling=opts["vae_tiling"],
                              warn=warn, taesd=taesd if opts.get("vae") else None):  # fmt: skip
                if isinstance(result, Written):
                    record = _record(result, model_path.stem, model_hash, sorted(from_model))
                    sys.stdout.write((json.dumps(record) if opts["json"] else str(result.path)) + "\n")
                    sys.stdout.flush()
                    progress.written(result)
                else:
                    fail(result.job.where(source.name), result.message)
        except Interrupted:
            dropped = True
    report.summary()
    if stopped():
        stderr(stopped_message(stopped(), report.written_count, len(planned), dropped, opts["batch_size"]))
        return 128 + stopped()
    return 1 if failures else 0


class _Source:
    """Where the jobs came from, for messages, and the prompt-file lines that could not be read."""

    def __init__(self, name: str, errors: list | None = None) -> None:
        self.name, self.errors = name, errors or []


def _jobs(command: str, opts: dict):
    """The run's jobs: the PROMPT argument, every line of --prompt-file, or the job a --from-png recorded."""
    from sdcli.jobs import Job, job_from_png, parse_prompt_file

    prompt, prompt_file, from_png = opts["prompt"], opts["prompt_file"], opts.get("from_png")
    if prompt_file is not None:
        if prompt is not None or from_png is not None:
            raise UsageError("give either a PROMPT, --prompt-file or --from-png")
        name = "stdin" if prompt_file == "-" else prompt_file
        text = sys.stdin.read() if prompt_file == "-" else _read_text(Path(prompt_file))
        jobs, errors = parse_prompt_file(
            text, jsonl=True if name.endswith(".jsonl") else None, image_fields=command != "txt2img"
        )
        if not jobs and not errors:
            raise UsageError(f"{name} holds no prompts (blank lines and # comments are skipped)")
        return jobs, _Source(name, errors), None
    if from_png is not None:
        png = job_from_png(from_png)
        # The PNG's settings replace the options' defaults; options given on the command line replace both.
        given = {k: opts[k] for k in SETTINGS if k in opts["given"]}
        values = {**png.job.values, **given}
        if opts["seed"] is not None:
            values["seed"] = opts["seed"]
        return [Job(values)], _Source(str(from_png)), png
    if prompt is None:
        raise UsageError("give a PROMPT (or --prompt-file FILE)")
    return [Job({})], _Source("command line"), None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {path}: {e}") from None


def _model_path(opts: dict, png, warn: Callable[[str], None]) -> Path:
    """The model file: --model, else the model a --from-png image names (in the weights folder only), else the
    default."""
    from sdcli.download import resolve_model
    from sdcli.weights import short_hash, weights_dir

    directory = weights_dir(opts["weights_dir"])
    name = opts["model"]
    if name is None and png is not None and png.model_name:
        found = _model_in_folder(png.model_name, directory)
        if found is None:
            raise SdcliError(
                f"{opts['from_png']} was made with the model '{png.model_name}', which is not in {directory}: "
                "pass --model (a path or a downloaded model's name)"
            )
        if png.model_hash and short_hash(found) != png.model_hash:
            warn(f"{found.name} is not the file the image was made with (hash {png.model_hash}): results will differ")
        return found
    return resolve_model(name, directory, offline=opts["offline"], token=opts["token"])


def _model_in_folder(name: str, directory: Path) -> Path | None:
    """The file called `name` (with or without .safetensors) directly in the weights folder, or None."""
    from sdcli.weights import SUFFIX

    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return None
    for candidate in (name, name + SUFFIX):
        path = directory / candidate
        if path.suffix == SUFFIX and path.is_file():
            return path
    return None


def _family(path: Path):
    """The model's family, from the file's header alone (no weights read)."""
    from sdcli.families import detect
    from sdcli.header import read_header

    return detect({key: info.shape for key, info in read_header(path).items()})


def _load(path: Path, opts: dict, warn: Callable[[str], None]):
    from sdcli.checkpoint import load_model
    from sdcli.devices import resolve_device, resolve_dtype, slow_dtype_note
    from sdcli.pipeline import compile_unet

    device = resolve_device(opts["device"])
    dtype = resolve_dtype(opts["dtype"], device)
    if note := slow_dtype_note(dtype, device):
        warn(note)
    model = load_model(path, device=device, dtype=dtype, offload=opts["low_memory"])
    if opts["compile_unet"]:
        compile_unet(model, warn)
    return model


def _taesd(model, opts: dict, warn: Callable[[str], None]):
    """TAESD for --vae taesd|taesdxl|FILE; for --preview alone, the model's TAESD when its files are in the
    weights folder (a preview does without: a broken one is a warning). None otherwise."""
    from sdcli.vae_choice import find_taesd, is_taesd, load_taesd_choice, taesd_name
    from sdcli.weights import weights_dir

    directory = weights_dir(opts["weights_dir"])
    choice = opts.get("vae")
    if choice is not None:
        if not is_taesd(choice):
            raise UsageError(f"--vae {choice}: not a TAESD file; give taesd, taesdxl or a TAESD .safetensors file")
        return load_taesd_choice(choice, directory, model.device, model.dtype)
    if opts.get("preview") is None or not find_taesd(taesd_name(model.family), directory):
        return None
    try:
        return load_taesd_choice(taesd_name(model.family), directory, model.device, model.dtype)
    except SdcliError as e:
        warn(f"previews use the linear approximation: {e}")
        return None


def _preview(model, opts: dict, taesd, warn: Callable[[str], None]):
    """The sampler callback that writes --preview FILE every --preview-every steps, or None."""
    from sdcli.pipeline import preview_writer
    from sdcli.request import DEFAULTS

    if opts.get("preview") is None:
        return None
    every = opts.get("preview_every") or DEFAULTS.preview_every
    return preview_writer(model, Path(opts["preview"]), every, taesd)


def _record(result, model_name: str, model_hash: str, from_model: list[str] | None = None) -> dict:
    """The JSON object --json prints for one written image: every setting that shapes the image, and which of
    them are the model's recommended ones (`model_defaults`)."""
    from sdcli.request import DEFAULTS
    from sdcli.sampler_names import resolve_sampler_and_schedule

    r = result.planned.request
    settings = result.planned.settings
    spec = resolve_sampler_and_schedule(r.sampler, r.schedule)  # with a schedule given, the sampler's base name
    record = {
        "path": str(result.path), "prompt": r.prompt, "negative": r.negative, "seed": r.seed, "steps": r.steps,
        "sampler": spec.display_name, "schedule": spec.schedule, "cfg": r.cfg,
        "size": f"{r.width}x{r.height}",
        "width": r.width, "height": r.height, "clip_skip": r.clip_skip, "model": model_name,
        "model_hash": model_hash, "seconds": round(result.seconds, 3),
    }  # fmt: skip
    if r.init is not None:
        record.update(
            init=str(settings.get("init")), strength=r.strength, resize=settings.get("resize", DEFAULTS.resize)
        )
    if r.mask is not None:
        record.update(
            mask=str(settings.get("mask")), mask_blur=r.mask_blur, invert_mask=bool(settings.get("invert_mask"))
        )
    if from_model := [key for key in from_model or () if key not in result.planned.job.values]:
        record["model_defaults"] = from_model
    if result.planned.job.line is not None:
        record["line"] = result.planned.job.line
    return record
