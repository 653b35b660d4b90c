"""The files a generating run reads: the model (and its family), the VAE file, the LoRA and embeddings folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdcli.errors import SdcliError


def model_path(opts: dict, png, warn: Callable[[str], None]) -> Path:
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


def model_family(path: Path, prediction: str | None = None):
    """The model's family, from the file's header (and, for SD 2.x's prediction type, one small tensor)."""
    from sdcli.prediction import detect_file

    return detect_file(path, prediction)[0]


def vae_file(opts: dict) -> Path | None:
    """The VAE file --vae names, unless it asks for TAESD (a name, or a file with TAESD's tensors)."""
    from sdcli.vae_choice import is_taesd

    choice = opts.get("vae")
    return None if choice is None or is_taesd(choice) else Path(choice).expanduser()


def uses_taesd(opts: dict) -> bool:
    """Whether --vae asks for TAESD, which then encodes and decodes in place of the checkpoint's VAE."""
    return opts.get("vae") is not None and vae_file(opts) is None


def check_vae(path: Path) -> None:
    """Refuse a VAE file that cannot be used (SdcliError naming it), reading only its header."""
    from sdcli.checkpoint import vae_file_infos
    from sdcli.header import read_header

    vae_file_infos(path, read_header(path))


def lora_dir(opts: dict) -> Path:
    """Where prompts' LoRA names are looked up: --lora-dir, else `loras/` in the weights folder."""
    from sdcli.weights import weights_dir

    given = opts.get("lora_dir")
    return Path(given).expanduser() if given else weights_dir(opts["weights_dir"]) / "loras"


def embedding_library(opts: dict):
    """The textual-inversion embeddings of --embeddings-dir (by default embeddings/ in the weights folder)."""
    from sdcli.embeddings import EmbeddingLibrary
    from sdcli.weights import weights_dir

    return EmbeddingLibrary(opts.get("embeddings_dir") or weights_dir(opts["weights_dir"]) / "embeddings")
