"""Single-file checkpoints: read the safetensors header, detect the family, load each network directly.

Our modules carry the checkpoint's attribute names, so loading a component is: take the keys under its
prefix, strip the prefix, cast each tensor into the target dtype and device, and assign it into a module
built on the meta device. The file is memory-mapped and read one tensor at a time, so no second full
copy of the weights is ever held.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path

import torch
from torch import nn

from sdcli.convert import vae_names_from_diffusers, vae_shape_from_diffusers
from sdcli.errors import CheckpointError
from sdcli.families import UNET_PREFIX, VAE_PREFIX, Family, detect
from sdcli.header import TensorInfo, read_header
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL
from sdcli.prediction import family_with_prediction
from sdcli.text_encoders import build_text_encoder, make_tokenizer

# Keys a component's prefix may hold that are not weights of ours: buffers older libraries saved.
IGNORED_SUFFIXES = ("position_ids",)
# Initialisers torch's layers call from their constructors; pointless for weights about to be replaced.
INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip
# Half-precision conversions PyTorch does element by element on the CPU; through fp32 both halves are SIMD.
SLOW_CPU_CASTS = {(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)}
SCRATCH_ELEMENTS = 1 << 22  # 16 MB of fp32: small, and large enough to amortise the loop
# A function applied to each tensor on its way from the file into a module: (full key, tensor) -> tensor.
Patch = Callable[[str, torch.Tensor], torch.Tensor]


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class TensorReader:
    """Tensors out of a memory-mapped .safetensors file, each copied straight into its target dtype and device.

    After each copy the file's pages are handed back to the OS (madvise DONTNEED), so at any moment memory
    holds the weights loaded so far plus one tensor of the file, never the file and the model side by side.
    No tensor keeps a reference into the mapping, so the file can change or vanish after loading.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scratch: torch.Tensor | None = None  # fp32 buffer for SLOW_CPU_CASTS, made on first use

    def __enter__(self) -> TensorReader:
        with self.path.open("rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self

    def __exit__(self, *exc) -> None:
        self.map.close()

    def read(
        self,
        info: TensorInfo,
        dtype: torch.dtype,
        device: torch.device | str,
        memory_format: torch.memory_format = torch.contiguous_format,
        patch: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The tensor `info` describes, in `dtype` (if floating point) on `device`.

        `patch`, if given, sees the file's tensor (a read-only view of the mapping, in the file's dtype) and
        returns the tensor to load in its place, before the cast.
        """
        file_dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if file_dtype is None:
            raise CheckpointError(f"{self.path}: tensor dtype {info.dtype} is not supported")
        count = info.end - info.start
        if count:
            with warnings.catch_warnings():  # the mapping is read-only, and we only ever copy out of it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(self.map, dtype=torch.uint8, count=count, offset=info.start)
            view = raw.view(file_dtype).view(info.shape)
        else:  # an empty tensor: nothing to map (frombuffer refuses a count of 0)
            raw = view = torch.empty(info.shape, dtype=file_dtype)
        if patch is not None:
            view = patch(view)
        target = dtype if file_dtype.is_floating_point else file_dtype
        if len(info.shape) != 4:
            memory_format = torch.contiguous_format
        tensor = torch.empty(info.shape, dtype=target, device=device, memory_format=memory_format)
        if (view.dtype, target) in SLOW_CPU_CASTS and tensor.device.type == "cpu":
            self._copy_through_fp32(tensor, view)
        else:
            tensor.copy_(view)
        del raw, view
        if hasattr(self.map, "madvise") and count:
            page = mmap.PAGESIZE
            first = info.start // page * page
            self.map.madvise(mmap.MADV_DONTNEED, first, info.end - first)
        return tensor

    def _copy_through_fp32(self, out: torch.Tensor, source: torch.Tensor) -> None:
        """out <- source, a block of rows at a time through an fp32 buffer: twice as fast, the same bits (a NaN
        may come back as another NaN).

        Each block of the buffer takes `out`'s strides, so the second copy is a flat one whatever the layout
        (contiguous or channels_last: both keep dimension 0 outermost).
        """
        row = math.prod(out.shape[1:])
        rows = SCRATCH_ELEMENTS // max(row, 1)
        if out.dim() == 0 or rows == 0 or out.stride(0) != row:  # scalar, huge rows, or dimension 0 not outermost
            out.copy_(source)
            return
        if self.scratch is None:
            self.scratch = torch.empty(SCRATCH_ELEMENTS, dtype=torch.float32)
        for first in range(0, out.shape[0], rows):
            block = out[first : first + rows]
            buffer = self.scratch.as_strided(block.shape, block.stride())
            buffer.copy_(source[first : first + rows])
            block.copy_(buffer)


@contextmanager
def skipped_initialisers() -> Iterator[None]:
    """Build modules without running torch's parameter initialisers (their values are about to be replaced).

    On the meta device they do no work, but the first one still imports torch's decompositions (about
    a second and a half per process).
    """
    saved = {name: getattr(nn.init, name) for name in INITIALISERS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _mismatch_error(path: Path, component: str, kind: str, keys: list[str]) -> CheckpointError:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return CheckpointError(
        f"{path}: {component}: {kind} {shown}; the file is damaged or not a Stable Diffusion checkpoint sdcli knows"
    )


def load_component(
    path: Path,
    reader: TensorReader,
    infos: dict[str, TensorInfo],
    prefix: str,
    build: Callable[[], nn.Module],
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
    patch: Patch | None = None,
) -> nn.Module:
    """Build a module on the meta device and fill it from the keys under `prefix`, cast one by one.

    `memory_format` applies to 4-D weights (convolutions): channels_last is faster on the CPU. `patch`: see
    `load_model`.
    """
    try:
        with torch.device("meta"), skipped_initialisers():
            module = build()
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # sizes read from a damaged header
        raise CheckpointError(f"{path}: {prefix}*: no network fits the shapes in the file ({e})") from e
    component = type(module).__name__
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {
        k[len(prefix) :]: info.shape
        for k, info in infos.items()
        if k.startswith(prefix) and info.shape and not k.endswith(IGNORED_SUFFIXES)
    }
    if missing := sorted(expected.keys() - found.keys()):
        raise _mismatch_error(path, component, "missing", [prefix + k for k in missing])
    if unexpected := sorted(found.keys() - expected.keys()):
        raise _mismatch_error(path, component, "unexpected", [prefix + k for k in unexpected])
    if wrong := [f"{prefix}{k} {found[k]} (expected {v})" for k, v in expected.items() if found[k] != v]:
        raise _mismatch_error(path, component, "wrong shape for", wrong)
    state = {
        k: reader.read(infos[prefix + k], dtype, device, memory_format, _bound(patch, prefix + k)) for k in expected
    }
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _bound(patch: Patch | None, key: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`patch` for one key, checking that it keeps the tensor's shape."""
    if patch is None:
        return None

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        out = patch(key, tensor)
        if tuple(out.shape) != tuple(tensor.shape):
            raise ValueError(f"the load patch changed {key} from {tuple(tensor.shape)} to {tuple(out.shape)}")
        return out

    return apply


@dataclass
class StableDiffusion:
    """A loaded checkpoint: its family, its networks and the tokenizers that feed its text encoders.

    `text_encoders[i]` is the network of `family.text_encoders[i]`. Computation runs on `device` in `dtype`.
    With `offload`, the networks wait on the CPU and each visits `device` only while it works (`use`), so a
    small GPU holds one network at a time.
    """

    family: Family
    text_encoders: tuple[nn.Module, ...]
    unet: UNetModel
    vae: AutoencoderKL
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    offload: bool = False
    compiled_unet: Callable | None = None  # set by `compile_unet`; the UNet's forward otherwise
    vae_path: Path | None = None  # the file the VAE came from, when not the checkpoint (`load_model(vae=...)`)

    @property
    def text_encoder(self) -> nn.Module:
        """The first text encoder (SD 1.x's only one)."""
        return self.text_encoders[0]

    @cached_property
    def tokenizers(self) -> tuple:
        """One tokenizer per text encoder, as its spec says."""
        return tuple(make_tokenizer(spec) for spec in self.family.text_encoders)

    @property
    def tokenizer(self):
        """The first text encoder's tokenizer."""
        return self.tokenizers[0]

    @contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` on the compute device for the duration (moved there and back when offloading)."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def components(
    family: Family, conv_format: torch.memory_format = torch.contiguous_format
) -> list[tuple[str, Callable[[], nn.Module], torch.memory_format]]:
    """Each network of `family` as (checkpoint prefix, builder, layout of its 4-D weights): the text
    encoders in the family's order, then the UNet and the VAE (laid out `conv_format`)."""
    return [
        *((spec.prefix, partial(build_text_encoder, spec), torch.contiguous_format) for spec in family.text_encoders),
        (UNET_PREFIX, partial(UNetModel, family.unet), conv_format),
        (VAE_PREFIX, partial(AutoencoderKL, family.vae), conv_format),
    ]


def vae_dtype(family: Family, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE's dtype: the model's, except fp16 for a VAE that overflows there (SDXL's), which gets bf16
    where the device supports it and fp32 elsewhere, so no image needs the fp32 redo."""
    if dtype != torch.float16 or not family.vae_fp16_overflows:
        return dtype
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if bf16 else torch.float32


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    offload: bool = False,
    patch: Patch | None = None,
    vae: str | os.PathLike | None = None,
    prediction: str | None = None,
    skip_vae: bool = False,
) -> StableDiffusion:
    """Load a single-file SD checkpoint (.safetensors, original layout) for `device` in `dtype`.

    Weights are cast once, straight from the memory-mapped file. With `offload` they stay on the CPU until
    a network is used (see StableDiffusion.use). On the CPU the convolutional networks are laid out
    channels_last, which oneDNN runs faster (bench/RESULTS.md).

    `patch(key, tensor) -> tensor` (LoRA, a VAE override, merges) is called for each tensor loaded, with its
    full checkpoint key and the file's tensor in the file's dtype, before the cast; what it returns (the
    same shape, any dtype) is loaded instead. It must return a new tensor rather than write into its
    argument, a read-only view of the file. One tensor at a time, so no second copy of the model is held.

    `vae`: a single-file VAE to use instead of the checkpoint's (see `vae_file_infos` for the layouts).

    `prediction` ("eps" or "v") overrides what the file says its UNet predicts (see `sdcli.prediction`).

    `skip_vae`: the VAE's weights are not read (TAESD encodes and decodes instead): its module stays on the
    meta device, where it answers for its shape and dtype but fails if run.
    """
    device = torch.device(device)
    path = Path(path)
    infos = read_header(path)
    family, _ = family_with_prediction(path, infos, detect({k: v.shape for k, v in infos.items()}), prediction)
    conv_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    target = "cpu" if offload else device
    parts = components(family, conv_format)
    dtypes = [dtype] * (len(parts) - 1) + [vae_dtype(family, dtype, device)]  # the VAE comes last
    vae_path = None if vae is None else Path(vae)
    with TensorReader(path) as reader:
        *text_encoders, unet, vae_module = [
            _unloaded(build, part_dtype)
            if skip_vae and prefix == VAE_PREFIX
            else load_vae_file(vae_path, build, part_dtype, target, memory_format)
            if vae_path is not None and prefix == VAE_PREFIX
            else load_component(path, reader, infos, prefix, build, part_dtype, target, memory_format, patch)
            for (prefix, build, memory_format), part_dtype in zip(parts, dtypes, strict=True)
        ]
    return StableDiffusion(
        family, tuple(text_encoders), unet, vae_module, path, device, dtype, offload, vae_path=vae_path
    )


def _unloaded(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """A network without weights: built on the meta device in `dtype`."""
    with torch.device("meta"), skipped_initialisers():
        return build().to(dtype)


# Keys a standalone VAE file may carry besides the network: the training loss's and the EMA's bookkeeping.
VAE_EXTRA_PREFIXES = ("loss.", "model_ema.")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_file_infos(path: Path, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """A VAE file's tensors under the checkpoint names of its VAE (`first_stage_model.` ...).

    Layouts: a checkpoint's (`first_stage_model.` keys; other networks in the file are ignored), the
    original one without the prefix (`encoder.down.0...`, as vae-ft-mse-840000), or diffusers'
    (`encoder.down_blocks.0...`), renamed through `convert`. Only names and shapes change: the bytes are
    read from the file as they are.
    """
    if any(key.startswith(VAE_PREFIX) for key in infos):
        return infos
    own = {k: v for k, v in infos.items() if not k.startswith(VAE_EXTRA_PREFIXES)}
    if not any(key.startswith(VAE_PARTS) for key in own):
        raise CheckpointError(f"{path}: not a VAE (no encoder./decoder. or first_stage_model. tensors)")
    if not any(".down_blocks." in key or ".up_blocks." in key for key in own):
        return {VAE_PREFIX + key: info for key, info in own.items()}
    names, unknown = vae_names_from_diffusers(own)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CheckpointError(f"{path}: diffusers VAE tensors that match nothing: {shown}; is it a VAE?")
    return {
        VAE_PREFIX + ours: replace(own[key], shape=vae_shape_from_diffusers(ours, own[key].shape))
        for key, ours in names.items()
    }


def load_vae_file(
    path: Path,
    build: Callable[[], nn.Module],
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> nn.Module:
    """A VAE from its own file (any layout `vae_file_infos` reads), loaded as a checkpoint's VAE is."""
    infos = vae_file_infos(path, read_header(path))
    with TensorReader(path) as reader:
        return load_component(path, reader, infos, VAE_PREFIX, build, dtype, device, memory_format)


@torch.no_grad()
def reload_weights(model: StableDiffusion, keys: Iterable[str], patch: Patch | None) -> None:
    """Read the checkpoint `keys` of a loaded model again from its file through `patch`, in place (the
    tensors keep their identity, so a compiled UNet stays valid): how a new LoRA set replaces the last."""
    infos = read_header(model.path)
    prefixes = [prefix for prefix, _, _ in components(model.family)]
    networks = dict(zip(prefixes, (*model.text_encoders, model.unet, model.vae), strict=True))
    with TensorReader(model.path) as reader:
        for key in sorted(keys):
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None or (prefix == VAE_PREFIX and model.vae_path is not None):
                raise ValueError(f"{key} is not a weight loaded from {model.path}")
            weight = networks[prefix].get_parameter(key[len(prefix) :])
            weight.copy_(reader.read(infos[key], weight.dtype, weight.device, patch=_bound(patch, key)))
