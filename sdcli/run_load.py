"""Loading for a generating run: the device and precision, the memory check before anything loads, the model
(LoRAs merged, VAE override, --compile-unet), TAESD, and the --preview callback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdcli.errors import SdcliError
from sdcli.run_files import uses_taesd, vae_file


def device_and_dtype(opts: dict, launch):
    """The compute device (this process's, under torchrun or srun) and the precision for it."""
    from sdcli.devices import resolve_device, resolve_dtype
    from sdcli.distributed import place

    device = place(resolve_device(opts["device"]), launch)
    return device, resolve_dtype(opts["dtype"], device)


def check_memory(path: Path, family, requests: list, opts: dict, device, dtype) -> None:
    """Refuse, before anything loads, a batch that cannot fit in the device's free memory (where it is known)."""
    from sdcli import tiling
    from sdcli.families import VAE_PREFIX
    from sdcli.header import read_header
    from sdcli.memory_check import check_fits

    free = tiling.available_memory(device)
    if free is not None:
        infos = read_header(path)
        if uses_taesd(opts):  # the checkpoint's VAE is never loaded
            infos = {key: info for key, info in infos.items() if not key.startswith(VAE_PREFIX)}
        check_fits(
            requests, family, infos, batch_size=opts["batch_size"], device=device, dtype=dtype,
            free=free, low_memory=opts["low_memory"], vae_tiling=opts["vae_tiling"],
        )  # fmt: skip


def load_run_model(path: Path, opts: dict, warn: Callable[[str], None], patch, device, dtype):
    """The model as the options ask: --vae FILE in place of its VAE (none read for TAESD), `patch` applied to
    each tensor as it loads (the LoRAs), --low-memory offloading, --compile-unet."""
    from sdcli.checkpoint import load_model
    from sdcli.devices import slow_dtype_note
    from sdcli.pipeline import compile_unet

    if note := slow_dtype_note(dtype, device):
        warn(note)
    vae = vae_file(opts)
    model = load_model(
        path, device=device, dtype=dtype, offload=opts["low_memory"], patch=patch, vae=vae,
        prediction=opts.get("prediction"), skip_vae=uses_taesd(opts),
    )  # fmt: skip
    if opts["compile_unet"]:
        compile_unet(model, warn)
    return model


def load_taesd(model, opts: dict, warn: Callable[[str], None]):
    """TAESD for --vae taesd|taesdxl|FILE; for --preview alone, the model's TAESD when its files are in the
    weights folder (a preview does without: a broken one is a warning). None otherwise."""
    from sdcli.vae_choice import find_taesd, load_taesd_choice, taesd_name
    from sdcli.weights import weights_dir

    directory = weights_dir(opts["weights_dir"])
    if uses_taesd(opts):
        return load_taesd_choice(opts["vae"], directory, model.device, model.dtype)
    if opts.get("preview") is None or not find_taesd(taesd_name(model.family), directory):
        return None
    try:
        return load_taesd_choice(taesd_name(model.family), directory, model.device, model.dtype)
    except SdcliError as e:
        warn(f"previews use the linear approximation: {e}")
        return None


def preview_callback(model, opts: dict, taesd):
    """The sampler callback that writes --preview FILE every --preview-every steps, or None."""
    from sdcli.pipeline import preview_writer
    from sdcli.request import DEFAULTS

    if opts.get("preview") is None:
        return None
    every = opts.get("preview_every") or DEFAULTS.preview_every
    return preview_writer(model, Path(opts["preview"]), every, taesd)
