"""Random-weight, full-size checkpoints of a model family (SD 1.5, SD 2.x, SDXL) in the original single-file
layout, a random TAESD, and offline diffusers configs for them.

The weights are random but shaped like the real thing, so every kernel does the work it does for a real
model. They are drawn directly in fp16, one tensor at a time, with fan-in scaling (std 1/sqrt(fan_in)),
norm scales near 1 and small biases, so activations stay near unit scale and finite in half precision.

The config folder is the diffusers-format skeleton (model_index.json, each component's config, the
tokenizer files sdcli ships) that `StableDiffusionPipeline.from_single_file(path, config=folder,
local_files_only=True)` needs to build an SD 1.x or 2.x pipeline without reaching the Hugging Face hub.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from sdcli.checkpoint import components, skipped_initialisers
from sdcli.families import CLIP_PREFIX, SD1, UNET_PREFIX, VAE_PREFIX, Family
from sdcli.models.configs import TAESD
from sdcli.models.openclip import OpenClipTextModel
from sdcli.models.taesd import Decoder, Encoder, to_diffusers_key
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL

# Bump a name's suffix when its weights' recipe changes. SD 1.5 keeps the name it had before other families.
CHECKPOINT_NAMES = {"sd1": "sd15-random-fp16-v2.safetensors"}
CONFIG_DIR_NAMES = {"sd1": "diffusers-config-v1"}
TAESD_DIR_NAME = "taesd-random-v1"  # diffusers' AutoencoderTiny folder: config.json + its safetensors
TESTS = Path(__file__).resolve().parent.parent / "tests"


def checkpoint_name(family: Family) -> str:
    return CHECKPOINT_NAMES.get(family.name, f"{family.name}-random-fp16-v1.safetensors")


def config_dir_name(family: Family) -> str:
    return CONFIG_DIR_NAMES.get(family.name, f"diffusers-config-{family.name}-v1")


def random_tensor(shape: tuple[int, ...], is_norm_scale: bool, generator: torch.Generator) -> torch.Tensor:
    """One parameter's random value in fp16; see the module docstring for the scales."""
    if len(shape) > 1:
        fan_in = math.prod(shape[1:])
        return (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).half()
    if is_norm_scale:
        return (1 + 0.1 * torch.randn(shape, generator=generator)).half()
    return (0.02 * torch.randn(shape, generator=generator)).half()


def norm_scales(module: nn.Module) -> set[str]:
    """Names of the scale parameters of `module`'s normalisation layers (found by type: UNet names like
    `in_layers.0` do not say "norm")."""
    norms = (nn.GroupNorm, nn.LayerNorm)
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, norms)}


def random_module_state(module: nn.Module, generator: torch.Generator, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random fp16 values for every tensor of `module` (built on the meta device), keyed `prefix + name`."""
    scales = norm_scales(module)
    return {
        prefix + name: random_tensor(tuple(meta.shape), name in scales, generator)
        for name, meta in module.state_dict().items()
    }


def random_state_dict(family: Family = SD1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint of `family`, random, fp16, keyed as the original files are."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    *text_encoders, unet, vae = components(family)
    for prefix, build, _ in (unet, vae, *text_encoders):  # SD 1.5's original order keeps its file's values
        with torch.device("meta"), skipped_initialisers():
            module = build()
        state.update(random_module_state(module, generator, prefix))
        if isinstance(module, OpenClipTextModel):  # a scalar real files carry (unused for text); sdcli skips it
            state[prefix + "logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    if any(spec.prefix == CLIP_PREFIX for spec in family.text_encoders):
        # Real SD 1.5 files carry this buffer; diffusers' conversion expects to skip it, sdcli ignores it.
        state[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def ensure_checkpoint(cache: Path, family: Family = SD1, seed: int = 0) -> Path:
    """The cached random checkpoint of `family`, built if it is not there yet (SD 1.5: 2.1 GB, a minute;
    SDXL: 6.9 GB and as much memory while it is built)."""
    from safetensors.torch import save_file

    path = cache / checkpoint_name(family)
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(random_state_dict(family, seed), str(partial), metadata={"format": "pt", "note": "random weights"})
    os.replace(partial, path)  # an interrupted build leaves no file that looks complete
    return path


def ensure_taesd(cache: Path, seed: int = 0) -> Path:
    """A random TAESD as diffusers' `AutoencoderTiny` folder (config.json and diffusion_pytorch_model.safetensors,
    the combined layout `sdcli --vae FILE` also reads); built once. Returns the folder."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    folder = cache / TAESD_DIR_NAME
    if (folder / "config.json").is_file():
        return folder
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for part, build in (("encoder", Encoder), ("decoder", Decoder)):
        with torch.device("meta"), skipped_initialisers():
            module = build(TAESD)  # the published taesd's shape
        for key, value in random_module_state(module, generator).items():
            state[to_diffusers_key(part, key)] = value
    partial = cache / (TAESD_DIR_NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, str(partial / "diffusion_pytorch_model.safetensors"))
    AutoencoderTiny().save_config(partial)  # its defaults are madebyollin/taesd's config
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def ensure_diffusers_config(cache: Path, family: Family = SD1) -> Path:
    """A diffusers-format config folder (no weights) for `from_single_file(..., config=folder)`, offline:
    SD 1.x (CLIP ViT-L) or SD 2.x (OpenCLIP ViT-H as transformers' CLIPTextModel, as diffusers converts it)."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(TESTS))  # the parity tests' config mapping, so bench and tests agree
    from reference import clip_text_config, ldm_original_config, open_clip_text_config

    if len(family.text_encoders) != 1:
        raise ValueError(f"no StableDiffusionPipeline config for {family.name}: one text encoder expected")
    name = config_dir_name(family)
    folder = cache / name
    if (folder / "model_index.json").is_file():
        return folder
    partial = cache / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    version = diffusers.__version__
    with torch.device("meta"):
        shapes = {UNET_PREFIX + k: v for k, v in UNetModel(family.unet).state_dict().items()}
        shapes.update({VAE_PREFIX + k: v for k, v in AutoencoderKL(family.vae).state_dict().items()})
    original = ldm_original_config(family.unet, family.vae)
    unet = sfu.create_unet_diffusers_config_from_ldm(original, shapes)
    vae = sfu.create_vae_diffusers_config_from_ldm(original, shapes)
    scheduler = {  # SD 1.5's and 2.x's noise schedule; DPM++ 2M Karras, as sdcli's default sampler
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if family.prediction == "v" else "epsilon",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "use_karras_sigmas": True,
    }
    pipeline = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    configs = {
        "model_index.json": pipeline,
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **unet},
        "vae/config.json": {"_class_name": "AutoencoderKL", **vae},
        "scheduler/scheduler_config.json": scheduler,
    }
    for file, config in configs.items():
        (partial / file).parent.mkdir(parents=True, exist_ok=True)
        (partial / file).write_text(json.dumps({**config, "_diffusers_version": version}, indent=2))
    spec = family.text_encoders[0]
    tokenizer = CLIPTokenizer.from_pretrained(str(files("sdcli") / "data"), local_files_only=True, model_max_length=77)
    if spec.prefix == CLIP_PREFIX:
        text = clip_text_config(spec.config, projection_dim=768, architectures=["CLIPTextModel"])
    else:
        # diffusers' conversion keeps the layers up to the one SD 2.x reads (the penultimate), then ln_final.
        text = open_clip_text_config(spec.config, num_hidden_layers=spec.layers_run(1))
        text.architectures = ["CLIPTextModel"]
        tokenizer.pad_token = "!"  # id 0: how OpenCLIP's tokenizer pads (SD 2.x's hub tokenizer says the same)
    text.save_pretrained(partial / "text_encoder")
    tokenizer.save_pretrained(partial / "tokenizer")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
