"""The plan of a generating run, made before any weights load: every job checked against the model's family,
its LoRAs resolved, the model's and LoRAs' recommended settings applied, and every image given its request,
seed and output path. Nothing here prints: warnings and failed jobs go to the caller's callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sdcli import run_files
from sdcli.errors import SdcliError, UsageError
from sdcli.run_jobs import SETTINGS, JobSource

if TYPE_CHECKING:
    from sdcli.batch import Planned
    from sdcli.distributed import Group
    from sdcli.families import Family
    from sdcli.jobs import Job, PngJob
    from sdcli.lora_sets import LoraLibrary


@dataclass
class RunPlan:
    """A run checked and named: what `plan_run` found, for loading and running it."""

    model_path: Path
    family: Family
    vae_file: Path | None  # --vae FILE (None for the checkpoint's own VAE, or TAESD)
    loras: LoraLibrary
    planned: list[Planned]  # every image, in prompt-file order, then image number
    run_seed: int
    run_seed_used: bool  # by a job without a seed of its own (or -1)
    job_defaults: dict[int, list[str]]  # by id(job): the settings the job takes from its model or LoRAs


def plan_run(
    command: str,
    opts: dict,
    jobs: list[Job],
    source: JobSource,
    png: PngJob | None,
    group: Group,
    warn: Callable[[str], None],
    fail: Callable[[str, str], None],
) -> RunPlan | None:
    """Plan the run of `jobs`; a job that cannot run is passed to `fail(where, message)` and left out (a single
    command-line job raises its error instead). None when nothing can run, or a job failed with --fail-fast."""
    from sdcli.batch import Planned, job_requests
    from sdcli.extra_networks import parse_lora_option
    from sdcli.lora_sets import LoraLibrary, check_recorded_hashes, parse_lora_hashes
    from sdcli.model_specs import lora_defaults, model_defaults
    from sdcli.outputs import Namer
    from sdcli.request import DEFAULTS, is_random_seed, model_settings, random_seed

    launch = group.launch
    # The model's family (read from the file's header, without loading it) gives the default size and
    # the limits a request is checked against, so every job is checked before the weights load.
    model_path = run_files.model_path(opts, png, warn)
    family = run_files.model_family(model_path, opts.get("prediction"))
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
    run_seed_used = False
    library = LoraLibrary(run_files.lora_dir(opts), model_path, ignore_unknown=bool(opts.get("lora_ignore_unknown")))
    run_loras = [parse_lora_option(text) for text in opts.get("lora") or ()]
    vae_file = run_files.vae_file(opts)
    if vae_file is not None:  # a VAE file that cannot be used is refused before anything loads
        run_files.check_vae(vae_file)
    if png is not None and png.vae_name and not opts.get("vae"):
        warn(f"the image was made with the VAE {png.vae_name}: pass --vae FILE to use it too")
    accepted = []
    job_defaults: dict[int, list[str]] = {}
    offset = 0

    def job_failed(job: Job, error: SdcliError) -> None:
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
                return None
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
                return None
            continue
        planned += [Planned(job, r, t, values) for r, t in zip(requests, targets, strict=True)]
    if not planned:
        return None
    if skip_existing and run_seed_used and is_random_seed(opts["seed"]):
        raise UsageError("--skip-existing finds the images of an earlier run only by their seeds: give --seed")
    return RunPlan(model_path, family, vae_file, library, planned, run_seed, run_seed_used, job_defaults)


def find_written(plan: RunPlan, group: Group, embeddings) -> list[bool]:
    """Which planned images an earlier run wrote (same file, same parameters, embeddings' `TI hashes`
    included): rank 0 looks, before any process writes, and tells the others, so every process deals the
    same remaining images."""
    from sdcli.batch import png_parameters, request_ti_hashes
    from sdcli.resume import already_written
    from sdcli.weights import short_hash

    model_hash, name = short_hash(plan.model_path), plan.model_path.stem

    def written(p: Planned) -> bool:
        try:
            ti_hashes = request_ti_hashes(p.request, embeddings, plan.family)
        except SdcliError:  # an embedding that does not fit: the job runs, and fails with that message
            return False
        return already_written(
            p.target, png_parameters(p.request, model_hash, name, plan.vae_file, ti_hashes, plan.family)
        )

    found = [int(written(p)) for p in plan.planned] if group.launch.rank == 0 else [0] * len(plan.planned)
    return [bool(done) for done in group.from_rank0(found)]
