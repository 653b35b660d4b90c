"""A random-weight, full-size SD 1.5 checkpoint in the original single-file layout, and an offline diffusers config.

The weights are random but shaped like the real thing, so every kernel does the work it does for a real
model. They are drawn directly in fp16, one tensor at a time, with fan-in scaling (std 1/sqrt(fan_in)),
norm scales near 1 and small biases, so activations stay near unit scale and finite in half precision.

The config folder is the diffusers-format skeleton (model_index.json, each component's config, the
tokenizer files sdcli ships) that `StableDiffusionPipeline.from_single_file(path, config=folder,
local_files_only=True)` needs to build the pipeline without reaching the Hugging Face hub.
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

from sdcli.families import CLIP_PREFIX, SD1, UNET_PREFIX, VAE_PREFIX, Family
from sdcli.models.clip import ClipTextModel
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL

CHECKPOINT_NAME = "sd15-random-fp16-v2.safetensors"  # bump the suffix when the weights' recipe changes
CONFIG_DIR_NAME = "diffusers-config-v1"
TESTS = Path(__file__).resolve().parent.parent / "tests"


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


def random_state_dict(family: Family = SD1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint of `family`, random, fp16, keyed as the original files are."""
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, UNetModel(family.unet)),
            (VAE_PREFIX, AutoencoderKL(family.vae)),
            (CLIP_PREFIX, ClipTextModel(family.text_encoders[0].config)),
        )
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module in parts:
        scales = norm_scales(module)
        for name, meta in module.state_dict().items():
            state[prefix + name] = random_tensor(tuple(meta.shape), name in scales, generator)
    # Real SD 1.5 files carry this buffer; diffusers' conversion expects to skip it, sdcli ignores it.
    state[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def ensure_checkpoint(cache: Path, seed: int = 0) -> Path:
    """The cached random checkpoint, built (about 2.1 GB, a minute) if it is not there yet."""
    from safetensors.torch import save_file

    path = cache / CHECKPOINT_NAME
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(random_state_dict(SD1, seed), str(partial), metadata={"format": "pt", "note": "random weights"})
    os.replace(partial, path)  # an interrupted build leaves no file that looks complete
    return path


def ensure_diffusers_config(cache: Path, family: Family = SD1) -> Path:
    """A diffusers-format config folder (no weights) for `from_single_file(..., config=folder)`, offline."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(TESTS))  # the parity tests' config mapping, so bench and tests agree
    from reference import clip_text_config, ldm_original_config

    folder = cache / CONFIG_DIR_NAME
    if (folder / "model_index.json").is_file():
        return folder
    partial = cache / (CONFIG_DIR_NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    version = diffusers.__version__
    with torch.device("meta"):
        shapes = {UNET_PREFIX + k: v for k, v in UNetModel(family.unet).state_dict().items()}
        shapes.update({VAE_PREFIX + k: v for k, v in AutoencoderKL(family.vae).state_dict().items()})
    original = ldm_original_config(family.unet, family.vae)
    unet = sfu.create_unet_diffusers_config_from_ldm(original, shapes)
    vae = sfu.create_vae_diffusers_config_from_ldm(original, shapes)
    scheduler = {  # SD 1.5's noise schedule; DPM++ 2M Karras, as sdcli's default sampler
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "epsilon",
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
    for name, config in configs.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_text(json.dumps({**config, "_diffusers_version": version}, indent=2))
    clip = clip_text_config(family.text_encoders[0].config, projection_dim=768, architectures=["CLIPTextModel"])
    clip.save_pretrained(partial / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(str(files("sdcli") / "data"), local_files_only=True, model_max_length=77)
    tokenizer.save_pretrained(partial / "tokenizer")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
