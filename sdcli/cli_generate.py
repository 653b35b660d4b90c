"""The body shared by txt2img, img2img and inpaint: options -> jobs -> images written, and the report.

Results go to stdout (one path, or one JSON object, per image); seeds, warnings, progress and errors to
stderr. A job that fails is reported with its prompt-file line and the others still run; the exit code
says what happened: 0 all written, 1 something failed, 128 + signal number when stopped by a signal.
Under torchrun or srun each process makes its share of the images (`sdcli.distributed`) and rank 0 prints
one summary of the whole run; the exit code is then the whole run's, on every process.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sdcli.errors import SdcliError, UsageError

# Options that are per-job settings: a prompt-file line or a PNG's parameters can set them too.
SETTINGS = (
    "prompt", "negative", "width", "height", "steps", "cfg", "sampler", "schedule", "n", "clip_skip",
    "init", "mask", "strength", "mask_blur", "invert_mask", "resize", "rng", "original_size", "crop",
)  # fmt: skip


def stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def generate_command(command: str, opts: dict) -> int:
    """Run one generating command with its parsed options; returns the exit code."""
    from sdcli.devices import resolve_device
    from sdcli.distributed import joined, launch_from_env, place

    launch = launch_from_env()
    device = place(resolve_device(opts["device"]), launch) if launch.distributed else None
    with joined(launch, device) as group:
        return _generate_command(command, opts, group)


def _generate_command(command: str, opts: dict, group) -> int:
    from sdcli.batch import Interrupted, Planned, Written, job_requests, run
    from sdcli.distributed import deal
    from sdcli.extra_networks import parse_lora_option
    from sdcli.lora_sets import ActiveLoras, LoraLibrary, check_recorded_hashes, parse_lora_hashes
    from sdcli.model_specs import lora_defaults, model_defaults
    from sdcli.outputs import Namer, ensure_writable
    from sdcli.progress import progress_report, sampling_steps
    from sdcli.request import DEFAULTS, is_random_seed, model_settings, random_seed
    from sdcli.signals import stop_on_signals, stopped_message
    from sdcli.weights import short_hash

    quiet = opts["quiet"]
    report = progress_report(opts["progress"], quiet)
    warn = (lambda message: None) if quiet else (lambda message: stderr(f"warning: {message}"))
    jobs, source, png = _jobs(command, opts)
    failures = 0
    launch = group.launch

    def fail(where: str, message: str, shared: bool = False) -> None:
        nonlocal failures
        if shared and launch.rank != 0:
            return  # every process finds it: rank 0 reports it once
        failures += 1
        stderr(f"error: {where}: {message}")

    for line_error in source.errors:
        fail(f"{source.name} line {line_error.line}", line_error.message, shared=True)
        if opts["fail_fast"]:
            return 1
    # The model's family (read from the file's header, without loading it) gives the default size and
    # the limits a request is checked against, so every job is checked before the weights load.
    model_path = _model_path(opts, png, warn)
    family = _family(model_path, opts.get("prediction"))
    if family.is_inpainting and command != "inpaint":
        raise UsageError(f"{model_path.name} is an inpainting model: use `sdcli inpaint` with --init and --mask")
    # With --skip-existing names start at 0 (not after the folder's highest number), so a re-run finds them.
    skip_existing = opts.get("skip_existing", False)
    namer = Namer(opts["output"], opts["outdir"], opts["name"], model_path.stem, overwrite=opts["overwrite"],
                  start=0 if skip_existing else None)  # fmt: skip
    max_images = opts.get("max_images") or DEFAULTS.max_images
    defaults = {k: opts[k] for k in SETTINGS if opts.get(k) is not None}
    # A distilled model's recommended settings replace the defaults of the options not typed.
    recommended = model_defaults(model_path)
    if command != "txt2img":  # img2img and inpaint keep the init image's size
        recommended = {k: v for k, v in recommended.items() if k not in ("width", "height")}
    from_model = model_settings(recommended, opts.get("given", set(opts)))
    defaults.update(from_model)
    run_seed = random_seed() if is_random_seed(opts["seed"]) else opts["seed"]
    if launch.distributed:  # every process names and seeds the images as rank 0 does
        namer.start, run_seed, now = group.from_rank0([namer.start, run_seed, int(namer.now.timestamp())])
        namer.now = datetime.fromtimestamp(now)
    run_seed_used = False  # by a job without a seed of its own (or -1)
    library = LoraLibrary(_lora_dir(opts), model_path, ignore_unknown=bool(opts.get("lora_ignore_unknown")))
    run_loras = [parse_lora_option(text) for text in opts.get("lora") or ()]
    if (vae_file := _vae_file(opts)) is not None:  # a VAE file that cannot be used is refused before anything loads
        _check_vae(vae_file)
    if png is not None and png.vae_name and not opts.get("vae"):
        warn(f"the image was made with the VAE {png.vae_name}: pass --vae FILE to use it too")
    accepted = []
    job_defaults: dict[int, list[str]] = {}  # the settings each job takes from its model or LoRAs
    offset = 0

    def job_failed(job, error: SdcliError) -> None:
        if len(jobs) == 1 and job.line is None:
            raise error  # a single command-line job: its error is the command's
        fail(job.where(source.name), str(error), shared=True)

    for job in jobs:
        values = {**defaults, **job.values}
        try:
            if command != "txt2img" and values.get("init") is None:
                raise UsageError(f'{command} needs an init image: --init IMAGE (or "init" in the prompt file)')
            if command == "inpaint" and values.get("mask") is None:
                raise UsageError('inpaint needs a mask: --mask MASK (or "mask" in the prompt file)')
            # The job's LoRAs: its prompt's <lora:...> tags, then --lora, then the line's own; each must fit the
            # model (LoraError naming the file) before anything loads.
            line_loras = job.values.get("lora") or []
            line_loras = [line_loras] if isinstance(line_loras, str) else line_loras
            options = [*run_loras, *(parse_lora_option(text) for text in line_loras)]
            values["prompt"], values["loras"] = library.resolve(values["prompt"], options)
            library.patch(values["loras"])
            # An LCM-LoRA's recommended settings replace the defaults of the options neither typed nor on the line.
            given = opts.get("given", set(opts)) | set(job.values)
            from_lora = model_settings(lora_defaults(ref.path for ref in values["loras"]), given)
            values.update(from_lora)
            job_defaults[id(job)] = sorted({*from_model, *from_lora})
            if png is not None:
                check_recorded_hashes(values["loras"], parse_lora_hashes(png.lora_hashes), warn)
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
    if skip_existing and run_seed_used and is_random_seed(opts["seed"]):
        raise UsageError("--skip-existing finds the images of an earlier run only by their seeds: give --seed")
    skipped = (
        _already_written(planned, model_path, vae_file, family, group, _embedding_library(opts))
        if skip_existing
        else [False] * len(planned)
    )
    todo = [p for p, done in zip(planned, skipped, strict=True) if not done]
    if not todo:
        return _final_report(group, 0, failures, len(planned), quiet)
    # Every image's global index is its place in the plan (prompt-file order, then image number).
    global_index = {id(p): i for i, p in enumerate(planned)}
    owners = deal([sampling_steps(p.request) for p in todo], launch.world_size)
    mine = [p for p, owner in zip(todo, owners, strict=True) if owner == launch.rank]
    if not mine:  # more processes than images left: this one only joins the report
        return _final_report(group, 0, failures, sum(skipped), quiet)
    ensure_writable(p.target.parent for p in planned)
    device, dtype = _device_and_dtype(opts, launch)
    _check_memory(model_path, family, [p.request for p in mine], opts, device, dtype)
    first_loras = planned[0].request.loras  # the batches run LoRA set by set, the first job's first
    embeddings = _embeddings(opts, family, planned, warn)
    with report.loading(model_path.name):
        model = _load(model_path, opts, warn, library.patch(first_loras), device, dtype)
        taesd = _taesd(model, opts, warn)
    loras = ActiveLoras(library, model, first_loras)
    model_hash = short_hash(model_path)
    if run_seed_used and is_random_seed(opts["seed"]) and not quiet and launch.rank == 0:
        stderr(f"seed: {run_seed}")

    dropped = False
    with stop_on_signals() as stopped, report.sampling(mine, opts["batch_size"]) as progress:
        preview = _preview(model, opts, taesd, warn)

        def on_step(info: dict) -> None:
            if stopped():
                raise Interrupted
            progress.step(info)
            if preview is not None:
                preview(info)

        try:
            for result in run(model, mine, batch_size=opts["batch_size"], overwrite=opts["overwrite"],
                              on_step=on_step, should_stop=stopped, vae_tiling=opts["vae_tiling"],
                              warn=warn, use_loras=loras.use, embeddings=embeddings,
                              taesd=taesd if opts.get("vae") and vae_file is None else None):  # fmt: skip
                if isinstance(result, Written):
                    record = _record(
                        result, model_path.stem, model_hash, model.vae_path, job_defaults[id(result.planned.job)]
                    )
                    record.update(index=global_index[id(result.planned)], rank=launch.rank)
                    sys.stdout.write((json.dumps(record) if opts["json"] else str(result.path)) + "\n")
                    sys.stdout.flush()
                    progress.written(result)
                else:
                    fail(result.job.where(source.name), result.message)
        except Interrupted:
            dropped = True
    report.summary()
    if stopped():
        stderr(stopped_message(stopped(), report.written_count, len(mine), dropped, opts["batch_size"]))
        return 128 + stopped()  # no final report: the other processes may be gone
    return _final_report(group, report.written_count, failures, sum(skipped), quiet)


def _already_written(planned: list, model_path: Path, vae_path: Path | None, family, group, embeddings) -> list[bool]:
    """Which planned images an earlier run wrote (same file, same parameters, embeddings' `TI hashes`
    included): rank 0 looks, before any process writes, and tells the others, so every process deals the
    same remaining images."""
    from sdcli.batch import png_parameters, request_ti_hashes
    from sdcli.resume import already_written
    from sdcli.weights import short_hash

    model_hash, name = short_hash(model_path), model_path.stem

    def written(p) -> bool:
        try:
            ti_hashes = request_ti_hashes(p.request, embeddings, family)
        except SdcliError:  # an embedding that does not fit: the job runs, and fails with that message
            return False
        return already_written(p.target, png_parameters(p.request, model_hash, name, vae_path, ti_hashes, family))

    found = [int(written(p)) for p in planned] if group.launch.rank == 0 else [0] * len(planned)
    return [bool(done) for done in group.from_rank0(found)]


def _final_report(group, written: int, failures: int, skipped: int, quiet: bool) -> int:
    """The exit code of the whole run (1 when any process had a failure); with several processes rank 0
    prints one line: images written, skipped and failed, and each process's counts."""
    counts = group.gather([written, failures])
    failed = sum(f for _, f in counts)
    if not quiet and group.launch.rank == 0 and (group.launch.distributed or skipped):
        line = f"{sum(w for w, _ in counts)} written, {skipped} skipped (already written), {failed} failed"
        if group.launch.distributed:
            ranks = "; ".join(f"rank {r}: {w} written, {f} failed" for r, (w, f) in enumerate(counts))
            line = f"run of {len(counts)} processes: {line}; {ranks}"
        stderr(line)
    return 1 if failed else 0


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


def _family(path: Path, prediction: str | None = None):
    """The model's family, from the file's header (and, for SD 2.x's prediction type, one small tensor)."""
    from sdcli.prediction import detect_file

    return detect_file(path, prediction)[0]


def _vae_file(opts: dict) -> Path | None:
    """The VAE file --vae names, unless it asks for TAESD (a name, or a file with TAESD's tensors)."""
    from sdcli.vae_choice import is_taesd

    choice = opts.get("vae")
    return None if choice is None or is_taesd(choice) else Path(choice).expanduser()


def _check_vae(path: Path) -> None:
    from sdcli.checkpoint import vae_file_infos
    from sdcli.header import read_header

    vae_file_infos(path, read_header(path))


def _lora_dir(opts: dict) -> Path:
    """Where prompts' LoRA names are looked up: --lora-dir, else `loras/` in the weights folder."""
    from sdcli.weights import weights_dir

    given = opts.get("lora_dir")
    return Path(given).expanduser() if given else weights_dir(opts["weights_dir"]) / "loras"


def tokens_command(prompt: str, model: str | None, steps: int, embeddings_dir, weights_dir) -> None:
    """`sdcli tokens`: the prompt's reading on stdout, warnings on stderr."""
    from sdcli.download import resolve_model
    from sdcli.families import SD1
    from sdcli.request import MAX_STEPS
    from sdcli.weights import weights_dir as resolve_weights_dir

    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    directory = resolve_weights_dir(weights_dir)
    family = SD1 if model is None else _family(resolve_model(model, directory, offline=True))
    opts = {"embeddings_dir": embeddings_dir, "weights_dir": weights_dir, "show_tokens": True}
    _show_prompts(opts, family, [(prompt, steps)], lambda m: stderr(f"warning: {m}"), sys.stdout.write)


def _embeddings(opts: dict, family, planned: list, warn: Callable[[str], None]):
    """The embeddings folder; warns about what the prompts probably did not mean, shows their tokens if asked."""
    texts = dict.fromkeys((p.request.prompt, p.request.steps) for p in planned)
    texts.update(dict.fromkeys((p.request.negative, p.request.steps) for p in planned if p.request.negative))
    return _show_prompts(opts, family, list(texts), warn, lambda text: sys.stderr.write(text))


def _show_prompts(opts: dict, family, texts: list[tuple[str, int]], warn: Callable[[str], None], out):
    """Warn about each prompt's doubtful parts; with show_tokens, write how it is read. Returns the library."""
    from sdcli.prompt_encoding import describe_prompt, prompt_warnings
    from sdcli.text_encoders import make_tokenizer

    library = _embedding_library(opts)
    for text, steps in texts:
        for message in prompt_warnings(text, library.missing(text)):
            warn(message)
        if opts.get("show_tokens"):
            spec = family.text_encoders[0]
            vectors = {name: e.vectors[0] for name, e in library.used_in([text], family).items()}
            lines = describe_prompt(text, steps, spec, make_tokenizer(spec), vectors)
            out("\n".join([f"prompt: {text}", *lines]) + "\n")
    return library


def _embedding_library(opts: dict):
    """The textual-inversion embeddings of --embeddings-dir (by default embeddings/ in the weights folder)."""
    from sdcli.embeddings import EmbeddingLibrary
    from sdcli.weights import weights_dir

    return EmbeddingLibrary(opts.get("embeddings_dir") or weights_dir(opts["weights_dir"]) / "embeddings")


def _device_and_dtype(opts: dict, launch):
    """The compute device (this process's, under torchrun or srun) and the precision for it."""
    from sdcli.devices import resolve_device, resolve_dtype
    from sdcli.distributed import place

    device = place(resolve_device(opts["device"]), launch)
    return device, resolve_dtype(opts["dtype"], device)


def _check_memory(path: Path, family, requests: list, opts: dict, device, dtype) -> None:
    """Refuse, before anything loads, a batch that cannot fit in the device's free memory (where it is known)."""
    from sdcli import tiling
    from sdcli.header import read_header
    from sdcli.memory_check import check_fits

    free = tiling.available_memory(device)
    if free is not None:
        check_fits(
            requests, family, read_header(path), batch_size=opts["batch_size"], device=device, dtype=dtype,
            free=free, low_memory=opts["low_memory"], vae_tiling=opts["vae_tiling"],
        )  # fmt: skip


def _load(path: Path, opts: dict, warn: Callable[[str], None], patch, device, dtype):
    from sdcli.checkpoint import load_model
    from sdcli.devices import slow_dtype_note
    from sdcli.pipeline import compile_unet

    if note := slow_dtype_note(dtype, device):
        warn(note)
    vae_file = _vae_file(opts)
    model = load_model(
        path, device=device, dtype=dtype, offload=opts["low_memory"], patch=patch, vae=vae_file,
        prediction=opts.get("prediction"), skip_vae=bool(opts.get("vae")) and vae_file is None,  # TAESD instead
    )  # fmt: skip
    if opts["compile_unet"]:
        compile_unet(model, warn)
    return model


def _taesd(model, opts: dict, warn: Callable[[str], None]):
    """TAESD for --vae taesd|taesdxl|FILE; for --preview alone, the model's TAESD when its files are in the
    weights folder (a preview does without: a broken one is a warning). None otherwise."""
    from sdcli.vae_choice import find_taesd, load_taesd_choice, taesd_name
    from sdcli.weights import weights_dir

    directory = weights_dir(opts["weights_dir"])
    choice = opts.get("vae")
    if choice is not None and _vae_file(opts) is None:
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


def _record(
    result, model_name: str, model_hash: str, vae: Path | None = None, from_model: list[str] | None = None
) -> dict:
    """The JSON object --json prints for one written image: every setting that shapes the image, and which of
    them are the model's recommended ones (`model_defaults`)."""
    from sdcli.lora_sets import lora_hash
    from sdcli.request import DEFAULTS
    from sdcli.sampler_names import resolve_sampler_and_schedule
    from sdcli.weights import short_hash

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
    if r.loras:
        record["loras"] = [
            {"name": ref.name, "path": str(ref.path), "te": ref.te, "unet": ref.unet, "hash": lora_hash(ref.path)}
            for ref in r.loras
        ]
    if vae is not None:
        record.update(vae=str(vae), vae_hash=short_hash(vae))
    if from_model := [key for key in from_model or () if key not in result.planned.job.values]:
        record["model_defaults"] = from_model
    if result.planned.job.line is not None:
        record["line"] = result.planned.job.line
    return record
