"""LoRA on SD 2.x equals the reference: diffusers' `StableDiffusionPipeline.load_lora_weights` + `fuse_lora`.

kohya-ss names SD 2.x's OpenCLIP ViT-H tower with transformers' CLIP names under `lora_te_`, diffusers/PEFT
under `text_encoder.`; their q/k/v LoRAs land in row blocks of OpenCLIP's fused `in_proj_weight`, and the
UNet's linear proj_in/proj_out take plain LoRAs. The files are named from the reference pipeline's own
modules; our patched checkpoint, converted by diffusers' single-file code, must hold the reference's fused
weights. As diffusers loads SD 2.x, the reference tower has no last block (SD 2.x conditions on the
penultimate layer), so the files adapt the blocks it has. Every kohya module has the same rank and alpha.
"""

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_lora_cli import CFG, SEED, SIZE, STEPS, generate
from test_lora_sdxl import add_module
from test_sd2 import TINY_SD2, reference_sd2_pipeline, write_sd2

from sdcli.families import OPENCLIP_PREFIX, UNET_PREFIX
from sdcli.lora import load_lora, lora_patch

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory) -> str:
    return write_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors", seed=5)


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="peft (a test extra) is needed for diffusers' load_lora_weights")


def reference_pipe(checkpoint: str):
    from reference import sd15_ddim_scheduler

    return reference_sd2_pipeline(checkpoint, TINY_SD2, sd15_ddim_scheduler())


def write_kohya(pipe, path, seed: int, rank: int = 4, alpha: float = 3.0) -> str:
    """A kohya-ss file adapting every Linear and Conv2d of the UNet and the text encoder, in diffusers' names
    (transformers 5 names CLIPTextModel's modules without the `text_model.` kohya files have)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, model, name_prefix in (("lora_unet_", pipe.unet, ""), ("lora_te_", pipe.text_encoder, "text_model.")):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module_name = prefix + (name_prefix + name).replace(".", "_")
                add_module(sd, module_name, tuple(module.weight.shape), rank, alpha, g)
    save_file(sd, str(path))
    return str(path)


def write_peft(checkpoint: str, path, seed: int) -> str:
    """A diffusers/PEFT file as diffusers saves one, alphas in its metadata."""
    import peft
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = reference_pipe(checkpoint)
    torch.manual_seed(seed)  # peft draws the random factors from the global generator
    unet_config = LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, alpha_pattern={"proj_in": 2.0},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv_shortcut"],
    )  # fmt: skip
    te_config = LoraConfig(
        r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc2"]
    )
    pipe.unet.add_adapter(unet_config)
    peft.inject_adapter_in_model(te_config, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )  # fmt: skip
    return str(path)


def fused_reference(checkpoint: str, path: str, weight: float):
    pipe = reference_pipe(checkpoint)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe


def assert_same_networks(ours, ref) -> None:
    for network in ("unet", "text_encoder"):
        a, b = getattr(ours, network).state_dict(), getattr(ref, network).state_dict()
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{network}.{key}")


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sd2_lora_equals_diffusers_fuse(peft, sd2_file, tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    path = write_kohya(reference_pipe(sd2_file), path, seed=1) if kind == "kohya" else write_peft(sd2_file, path, 2)
    ref = fused_reference(sd2_file, path, -0.7)
    sd = load_file(sd2_file)
    patch = lora_patch([(load_lora(path), -0.7, -0.7)], TINY_SD2, {k: tuple(v.shape) for k, v in sd.items()})
    patched = tmp_path / "patched.safetensors"
    save_file({k: patch(k, v) for k, v in sd.items()}, str(patched))
    assert_same_networks(reference_pipe(str(patched)), ref)
    adapted_blocks = TINY_SD2.text_encoders[0].config.layers - 1  # all but the last, which diffusers drops
    fused = [k for k in patch.keys if k.startswith(OPENCLIP_PREFIX) and k.endswith("attn.in_proj_weight")]
    assert len(fused) == adapted_blocks
    assert UNET_PREFIX + "input_blocks.1.1.proj_in.weight" in patch.keys  # SD 2.x's linear projection


def test_cli_with_an_sd2_lora_equals_diffusers_fused_pipeline(peft, sd2_file, tmp_path):
    path = write_kohya(reference_pipe(sd2_file), tmp_path / "style.safetensors", seed=3)
    pipe = fused_reference(sd2_file, path, 0.9)
    expected = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    plain = generate(sd2_file, tmp_path / "plain.png", PROMPT)
    ours = generate(sd2_file, tmp_path / "ours.png", PROMPT, "--lora", f"{path}:0.9")
    assert np.abs(ours - expected).mean() < 1 / 255
    assert np.abs(plain - expected).mean() > 4 / 255  # the LoRA changes the image well beyond the tolerance


def test_sd1_lora_on_sd2_is_a_one_line_error_naming_the_file(sd2_file, tiny_checkpoint, tmp_path):
    from test_lora import reference_pipe as sd1_pipe
    from test_lora import write_kohya_lora

    lora = write_kohya_lora(sd1_pipe(tiny_checkpoint), tmp_path / "sd1-lora.safetensors", seed=6)
    out = tmp_path / "out.png"
    result = run_cli("txt2img", "a cat", "-m", sd2_file, "-W", 64, "-H", 64, "--steps", 1, "--lora", lora, "-o", out)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert str(lora) in lines[0] and not out.exists()
