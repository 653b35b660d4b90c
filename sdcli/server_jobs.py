"""What `sdcli serve` runs behind its routes: A1111 payloads checked and turned into the CLI's own jobs
(`sdcli.batch.job_requests`), run one at a time through `sdcli.batch.run`, and answered as A1111 does.

Because the jobs and the run are the CLI's, an image is byte for byte the PNG the CLI writes for the same
settings, device and dtype. Models are named, never given as paths: files in the weights folder, and the
one the server was started with.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdcli import __version__
from sdcli.batch import Interrupted, Planned, Written, job_requests, run
from sdcli.checkpoint import StableDiffusion, load_model
from sdcli.embeddings import EmbeddingLibrary, load_embedding
from sdcli.errors import SdcliError
from sdcli.families import Family, detect
from sdcli.header import read_header
from sdcli.jobs import Job
from sdcli.lora_sets import ActiveLoras, LoraLibrary, LoraSet
from sdcli.memory_check import check_fits
from sdcli.progress import Report
from sdcli.request import DEFAULTS, is_random_seed, random_seed
from sdcli.sampler_names import SAMPLERS, resolve_sampler, resolve_sampler_and_schedule
from sdcli.server_models import RESIZE_MODES, Img2ImgRequest, Txt2ImgRequest, unsupported_fields
from sdcli.server_queue import JobQueue
from sdcli.tiling import available_memory, is_out_of_memory
from sdcli.weights import list_local_models, short_hash

MAX_IMAGES_PER_REQUEST = 100
# A1111's scheduler names -> ours ("uniform" is the model's own grid, our "normal").
SCHEDULERS = {"automatic": None, "uniform": "normal", "karras": "karras", "exponential": "exponential"}
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # "model.safetensors [0123456789]"


class ServerError(SdcliError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Settings:
    """How the server was started (the `sdcli serve` options)."""

    model: Path
    weights_dir: Path
    device: torch.device
    dtype: torch.dtype
    queue: int = 4
    users: dict[str, str] = field(default_factory=dict)  # HTTP basic: user -> password
    token: str | None = None
    max_pixels: int = 1024 * 1024
    max_body: int = 50 * 1024 * 1024
    max_images: int = MAX_IMAGES_PER_REQUEST
    lora_dir: Path | None = None  # where <lora:NAME:...> finds NAME; None: loras/ in the weights folder
    embeddings_dir: Path | None = None  # None: embeddings/ in the weights folder

    def __post_init__(self) -> None:
        self.lora_dir = self.lora_dir or self.weights_dir / "loras"
        self.embeddings_dir = self.embeddings_dir or self.weights_dir / "embeddings"


class Models:
    """The one loaded model, and the models a request may name: files in the weights folder, and the one
    the server was started with. Loading happens on the generation thread only.

    `selected` is the model of requests that name none (the startup model, or the last one set through
    /options); a request naming another runs with it without changing `selected`, as A1111 restores its
    settings after such a request. The model stays loaded until a request needs another; its weights hold
    the LoRA set of the last request (`active`), replaced by the next request's set without a reload."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.startup = settings.model.resolve()
        self.selected = self.startup
        self.model: StableDiffusion | None = None
        self.active: ActiveLoras | None = None  # the loaded model's LoRA library and the set in its weights
        self.clip_skip = DEFAULTS.clip_skip
        self._families: dict[Path, Family] = {}

    def available(self) -> list[Path]:
        found = [p.resolve() for p in list_local_models(self.settings.weights_dir)]
        return found if self.startup in found else [self.startup, *found]

    def find(self, name: str) -> Path:
        """The model called `name` (a file name, its stem, or A1111's title "name.safetensors [hash]")."""
        plain = _TITLE_HASH.sub("", name.strip())
        for path in self.available():
            if plain in (path.name, path.stem):
                return path
        raise ServerError(
            f"no model called {name!r}: GET /sdapi/v1/sd-models lists them (models are named, never given as paths)"
        )

    def family(self, path: Path) -> Family:
        if path not in self._families:
            self._families[path] = detect({key: info.shape for key, info in read_header(path).items()})
        return self._families[path]

    def library(self, path: Path) -> LoraLibrary:
        """The LoRA library of checkpoint `path`: the loaded model's own (it holds the files read), or a new one."""
        active = self.active  # read once: the generation thread may switch models meanwhile
        if active is not None and active.model.path.resolve() == path:
            return active.library
        return LoraLibrary(self.settings.lora_dir, path)

    def ensure(self, path: Path, loras: LoraSet | None = None) -> StableDiffusion:
        """The loaded model, switched to `path` first when it is another file, with the LoRA set `loras` in its
        weights (None: the set it holds). Raises LoraError, before anything changes, for a LoRA that does not fit."""
        if self.model is not None and self.active is not None and self.model.path.resolve() == path:
            if loras is not None:
                self.active.use(loras)  # only the weights either set changes are read again
                self.active.library.keep_only(loras)
            return self.model
        library = LoraLibrary(self.settings.lora_dir, path)
        patch = library.patch(loras or ())
        self.model = self.active = None  # free the old weights before reading the new ones
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.model = load_model(path, device=self.settings.device, dtype=self.settings.dtype, patch=patch)
        except (MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            raise ServerError(f"ran out of memory loading {path.name}", 507) from None
        self.active = ActiveLoras(library, self.model, loras or ())
        return self.model

    def title(self, path: Path, with_hash: bool = True) -> str:
        return f"{path.name} [{short_hash(path)}]" if with_hash else path.name


class ProgressReport(Report):
    """The state of the job in flight, for GET /sdapi/v1/progress: the last event, and the sampler's latest
    prediction of the clean latents, for a preview."""

    def __init__(self, xl: bool) -> None:
        super().__init__(summary=False)
        self.last: dict = {}
        self.denoised: torch.Tensor | None = None
        self.xl = xl

    def show(self, event: dict) -> None:
        self.last = event

    def step(self, info: dict) -> None:
        if info.get("denoised") is not None:
            self.denoised = info["denoised"]
        super().step(info)

    def preview_png(self) -> str | None:
        """The first image of the batch in flight as the latents now predict it (A1111's "Approx cheap"
        preview, at latent resolution), base64 PNG; None before the first step."""
        from sdcli.preview import SD_LATENT_RGB, SDXL_LATENT_RGB, approximate_rgb

        latents = self.denoised
        if latents is None:
            return None
        rgb = approximate_rgb(latents[:1].float().cpu(), SDXL_LATENT_RGB if self.xl else SD_LATENT_RGB)[0]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (h, w, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Plan:
    """One request turned into sdcli's requests, ready for the generation thread."""

    model: Path
    planned: list[Planned]
    batch_size: int
    payload: dict
    command: str
    loras: LoraSet = ()
    embeddings: EmbeddingLibrary | None = None


class Service:
    """What the routes share: the settings, the models, the queue and the job in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = Models(settings)
        self.queue = JobQueue(settings.queue)
        self.progress: ProgressReport | None = None
        self.job_timestamp = ""
        self.command = ""

    def load(self) -> None:
        """Load the startup model (before the server takes requests)."""
        self.models.ensure(self.models.startup)

    def plan(self, payload: Txt2ImgRequest, command: str) -> Plan:
        """Check a payload and turn it into requests; images are decoded here. Raises ServerError."""
        bad = unsupported_fields(payload)
        if bad:
            raise ServerError(
                f"unsupported field{'s' if len(bad) > 1 else ''} {', '.join(bad)}: sdcli cannot honour "
                f"{'them' if len(bad) > 1 else 'it'}, and ignoring {'them' if len(bad) > 1 else 'it'} would change "
                "the image; leave it out (or at A1111's default)"
            )
        overrides = payload.override_settings or {}
        checkpoint = overrides.get("sd_model_checkpoint")
        model = self.models.find(checkpoint) if isinstance(checkpoint, str) and checkpoint else self.models.selected
        family = self.models.family(model)
        values: dict[str, Any] = {"prompt": payload.prompt, "negative": payload.negative_prompt}
        # The prompt's <lora:NAME:W> tags, found in the LoRA folder (UsageError, a 422, for a bad tag or name); they
        # are checked against the model on the generation thread.
        values["loras"] = ()
        if not payload.disable_extra_networks:
            _, values["loras"] = self.models.library(model).resolve(payload.prompt)
        # Read now, so that an embedding made for another model family is a 422 before the request is queued.
        embeddings = EmbeddingLibrary(self.settings.embeddings_dir)
        embeddings.used_in([payload.prompt, payload.negative_prompt], family)
        values["sampler"] = _sampler(payload)
        for key, name in (("steps", "steps"), ("cfg", "cfg_scale"), ("width", "width"), ("height", "height")):
            if getattr(payload, name) is not None:
                values[key] = getattr(payload, name)
        clip_skip = overrides.get("CLIP_stop_at_last_layers", self.models.clip_skip)
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool):
            raise ServerError("override_settings.CLIP_stop_at_last_layers must be an integer")
        values["clip_skip"] = clip_skip
        _check_noise(payload, values["sampler"])
        count = payload.n_iter * payload.batch_size
        if count > self.settings.max_images:
            raise ServerError(f"n_iter x batch_size is {count}: at most {self.settings.max_images} images a request")
        values["n"] = count
        seed = random_seed() if is_random_seed(payload.seed) else payload.seed  # job_requests checks its range
        self._check_size(values.get("width"), values.get("height"), family)
        with tempfile.TemporaryDirectory(prefix="sdcli-serve-") as folder:
            if isinstance(payload, Img2ImgRequest):
                command = self._image_values(payload, values, Path(folder))
            if family.is_inpainting and command != "inpaint":
                raise ServerError(f"{model.name} is an inpainting model: use /sdapi/v1/img2img with a mask")
            requests = job_requests(values, seed, family=family, max_images=self.settings.max_images)
        first = requests[0]
        self._check_size(first.width, first.height, family)
        job = Job(values)
        settings = {k: v for k, v in values.items() if k not in ("init", "mask")}
        planned = [Planned(job, r, Path(f"{i:05d}.png"), settings) for i, r in enumerate(requests)]
        parameters = payload.model_dump()
        if command != "txt2img":  # as A1111: the images are not sent back
            parameters.update(init_images=None, mask=None)
        return Plan(model, planned, payload.batch_size, parameters, command, values["loras"], embeddings)

    def _check_size(self, width: int | None, height: int | None, family: Family) -> None:
        width, height = width or family.default_size, height or family.default_size
        if width * height > self.settings.max_pixels:
            raise ServerError(
                f"{width}x{height} is more than the {self.settings.max_pixels} pixels this server makes (--max-pixels)"
            )

    def _image_values(self, payload: Img2ImgRequest, values: dict, folder: Path) -> str:
        """Decode init image and mask into `folder` and add their settings to `values`; the command name."""
        values["init"] = str(self._decoded(payload.init_images[0], "init_images", folder / "init"))
        if payload.denoising_strength is not None:
            values["strength"] = payload.denoising_strength
        if payload.resize_mode not in RESIZE_MODES:
            raise ServerError(f"resize_mode {payload.resize_mode} is not supported: use 0 (stretch), 1 (crop), 2 (fit)")
        values["resize"] = RESIZE_MODES[payload.resize_mode]
        if len(payload.init_images) > 1:
            raise ServerError("init_images holds more than one image: sdcli uses one init image per request")
        if payload.mask is None:
            return "img2img"
        if (payload.model_extra or {}).get("inpaint_full_res"):
            raise ServerError(
                "unsupported field inpaint_full_res: sdcli inpaints the whole picture; send inpaint_full_res: false"
            )
        values["mask"] = str(self._decoded(payload.mask, "mask", folder / "mask"))
        blur = payload.mask_blur
        if blur is None:
            x, y = payload.mask_blur_x, payload.mask_blur_y
            if x is not None and y is not None and x != y:
                raise ServerError("mask_blur_x and mask_blur_y differ: sdcli blurs the mask equally in x and y")
            blur = x if x is not None else DEFAULTS.mask_blur
        values["mask_blur"] = blur
        values["invert_mask"] = bool(payload.inpainting_mask_invert)
        return "inpaint"

    def _decoded(self, data: str, name: str, path: Path) -> Path:
        """Write a base64 image (with or without a data: URL prefix) to `path`, checking its size first."""
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ServerError(f"{name} is not base64: send the image file's bytes base64-encoded") from None
        try:
            with Image.open(io.BytesIO(raw)) as image:  # reads the header only
                width, height = image.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise ServerError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
        if width * height > 4 * self.settings.max_pixels:
            raise ServerError(f"{name} is {width}x{height}: too large for this server (--max-pixels)", 413)
        path.write_bytes(raw)
        return path

    def generate(self, plan: Plan) -> dict:
        """Run a plan on the generation thread; the A1111 response body."""
        model = self.models.ensure(plan.model, plan.loras)
        self._check_memory(model, plan)
        report = ProgressReport(xl=model.family.unet.adm_in_channels > 0)
        self.progress = report
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.command = plan.command
        images: list[tuple[Any, bytes]] = []
        interrupted = False
        failure: str | None = None
        stop = self.queue.interrupted
        with tempfile.TemporaryDirectory(prefix="sdcli-serve-") as folder:
            planned = [Planned(p.job, p.request, Path(folder) / p.target, p.settings) for p in plan.planned]
            with report.sampling(planned, plan.batch_size):

                def on_step(info: dict) -> None:
                    if stop():
                        raise Interrupted
                    report.step(info)

                try:
                    for result in run(model, planned, batch_size=plan.batch_size, overwrite=True, on_step=on_step,
                                      should_stop=stop, use_loras=self.models.active.use,
                                      embeddings=plan.embeddings):  # fmt: skip
                        if isinstance(result, Written):
                            images.append((result.planned.request, result.path.read_bytes()))
                            report.written(result)
                        else:
                            failure = result.message
                except Interrupted:
                    interrupted = True
        self.progress = None  # nothing in flight: let the latents go
        if failure is not None and not images:
            raise ServerError(failure, 507 if "out of memory" in failure else 500)
        return self._response(plan, model, images, interrupted or stop())

    def _check_memory(self, model: StableDiffusion, plan: Plan) -> None:
        """507 before sampling when the plan's batches cannot fit beside the loaded model (checked here, on
        the generation thread, so that no other job's activations count against it)."""
        free = available_memory(self.settings.device)
        try:
            check_fits(
                [p.request for p in plan.planned], model.family, read_header(model.path), batch_size=plan.batch_size,
                device=self.settings.device, dtype=self.settings.dtype, free=free, low_memory=False,
                vae_tiling=None, loaded=True,
            )  # fmt: skip
        except SdcliError as error:
            raise ServerError(str(error), 507) from None

    def _response(self, plan: Plan, model: StableDiffusion, images: list, interrupted: bool) -> dict:
        requests = [p.request for p in plan.planned]
        first = requests[0]
        infotexts = [Image.open(io.BytesIO(data)).info.get("parameters") for _, data in images]
        info = {
            "prompt": first.prompt, "all_prompts": [r.prompt for r in requests],
            "negative_prompt": first.negative, "all_negative_prompts": [r.negative for r in requests],
            "seed": first.seed, "all_seeds": [r.seed for r in requests],
            "subseed": first.seed, "all_subseeds": [r.seed for r in requests], "subseed_strength": 0,
            "width": first.width, "height": first.height, "sampler_name": resolve_sampler(first.sampler).display_name,
            "cfg_scale": first.cfg, "steps": first.steps, "batch_size": plan.batch_size, "restore_faces": False,
            "sd_model_name": model.path.stem, "sd_model_hash": short_hash(model.path),
            "denoising_strength": first.strength if first.init is not None else None, "clip_skip": first.clip_skip,
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": self.job_timestamp,
            "is_using_inpainting_conditioning": model.family.is_inpainting, "interrupted": interrupted,
            "version": f"sdcli {__version__}",
        }  # fmt: skip
        send = plan.payload.get("send_images", True)
        encoded = [base64.b64encode(data).decode("ascii") for _, data in images] if send else []
        return {"images": encoded, "parameters": plan.payload, "info": json.dumps(info)}

    def embeddings_body(self) -> dict:
        """A1111's /embeddings answer for the embeddings folder: those the selected model can use, by name, with
        their width (`shape`) and number of vectors; the others (another family, unreadable) under `skipped`."""
        family = self.models.family(self.models.selected)
        unknown = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        loaded, skipped = {}, {}
        for name, path in EmbeddingLibrary(self.settings.embeddings_dir).files.items():
            try:
                vectors = load_embedding(path, family).vectors[0]
            except SdcliError:
                skipped[name] = {**unknown, "shape": None, "vectors": None}
            else:
                loaded[name] = {**unknown, "shape": vectors.shape[-1], "vectors": vectors.shape[0]}
        return {"loaded": loaded, "skipped": skipped}

    def progress_body(self, with_image: bool = False) -> dict:
        """A1111's progress answer; with the preview of the image in flight when `with_image`."""
        report = self.progress
        busy = self.queue.busy and report is not None
        fraction, eta, step, steps = 0.0, 0.0, 0, 0
        if busy and report.total_steps:
            fraction = min(report.steps_done / report.total_steps, 1.0)
            elapsed = report.clock() - report.start
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
            step, steps = report.last.get("step", 0), report.last.get("steps", 0)
        state = {
            "skipped": False, "interrupted": busy and self.queue.interrupted(), "job": self.command if busy else "",
            "job_count": self.queue.waiting + (1 if busy else 0), "job_timestamp": self.job_timestamp,
            "job_no": report.written_count if busy else 0, "sampling_step": step, "sampling_steps": steps,
        }  # fmt: skip
        image = report.preview_png() if busy and with_image else None
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}


def _sampler(payload: Txt2ImgRequest) -> str:
    """The sdcli sampler name for A1111's sampler_name (or the older sampler_index) and scheduler."""
    extra = payload.model_extra or {}
    name = payload.sampler_name or extra.get("sampler_index") or DEFAULTS.sampler
    if not isinstance(name, str):
        raise ServerError("sampler_name must be a string")
    try:
        spec = resolve_sampler(name)
        key = (payload.scheduler or "automatic").strip().lower()
        if key not in SCHEDULERS:
            raise ServerError(f"unsupported field scheduler: {payload.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        schedule = SCHEDULERS[key]
        if schedule is None:
            return spec.name
        wanted = resolve_sampler_and_schedule(name, schedule)
    except SdcliError as error:
        raise ServerError(str(error)) from None
    for candidate in SAMPLERS.values():  # the registry's name for that sampler on that grid
        if candidate.fn is wanted.fn and candidate.schedule == wanted.schedule:
            return candidate.name
    raise ServerError(f"unsupported field scheduler: {payload.scheduler!r} with {name}")


def _check_noise(payload: Txt2ImgRequest, sampler: str) -> None:
    """A1111's eta and s_noise change only samplers that add noise (and eta DDIM); sdcli runs those at A1111's
    defaults: eta 1 (0 for DDIM) and s_noise 1."""
    spec = resolve_sampler(sampler)
    ddim = spec.name == "ddim"
    if (spec.stochastic or ddim) and payload.eta is not None and payload.eta != (0.0 if ddim else 1.0):
        raise ServerError(f"unsupported field eta: {payload.eta} (sdcli's {spec.display_name} runs at A1111's default)")
    if spec.stochastic and payload.s_noise is not None and payload.s_noise != 1.0:
        raise ServerError(f"unsupported field s_noise: {payload.s_noise} (sdcli's {spec.display_name} runs at 1)")
