"""DoRA merges as peft merges it: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=w)` on a PEFT DoRA file.

peft (the reference behind diffusers) merges a DoRA module as W' = m * (W + w dW) / ||W + w dW||, the norm per
output row (over inputs and kernel). The files are what diffusers saves from peft adapters with `use_dora`,
their magnitudes moved off their initial values (the norms of W + dW) so that they matter. diffusers 0.42
does not load a text encoder's magnitudes (it looks for `lora_magnitude_vector.<adapter>.weight` and starts
them afresh), so there the reference is peft's own merge of the adapters the file was saved from. LyCORIS'
DoRA (`dora_scale`) has no reference (diffusers drops those tensors) and is refused by name.
"""

import pytest
import torch
from conftest import TINY_SD1
from safetensors.torch import load_file, save_file
from test_lora import assert_state_dicts_equal, patched_state_dicts, reference_pipe, shapes_of
from test_lora_sdxl import TINY_SDXL, sdxl_file  # noqa: F401 (a fixture)
from test_lora_sdxl import reference_pipe as sdxl_pipe

from sdcli.errors import LoraError
from sdcli.families import SDXL_BIGG_PREFIX
from sdcli.lora import load_lora, lora_patch


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="peft (a test extra) is needed for diffusers' load_lora_weights")


def add_dora(peft, model, target_modules, seed: int, r: int = 4, alpha: float = 6):
    """peft DoRA adapters with random factors and magnitudes 0.8 to 1.2 times their initial values."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, use_dora=True,
                             target_modules=target_modules)  # fmt: skip
    torch.manual_seed(seed)  # peft draws the random factors from the global generator
    peft.inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=g) - 1))
    return peft.utils.get_peft_model_state_dict(model), config.to_dict()


def merged_by_peft(model, weight: float) -> dict:
    """peft's merge of the adapters in `model` at lora_scale `weight`: the state dict with each LoRA layer
    replaced by its merged base layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.scale_layer(weight)
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model.state_dict()


def fuse(pipe, path: str, weight: float):
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()
    return pipe


def test_peft_dora_on_sd1_equals_diffusers_fuse(peft, tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = reference_pipe(tiny_checkpoint)
    unet, unet_config = add_dora(peft, pipe.unet, ["to_q", "to_out.0", "proj_in", "conv1", "conv_shortcut"], 1)
    te, te_config = add_dora(peft, pipe.text_encoder, ["q_proj", "fc1"], 2, r=2, alpha=3)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, weight_name="dora.safetensors", unet_lora_layers=unet, text_encoder_lora_layers=te,
        unet_lora_adapter_metadata=unet_config, text_encoder_lora_adapter_metadata=te_config,
    )  # fmt: skip
    path = str(tmp_path / "dora.safetensors")
    ref = fuse(reference_pipe(tiny_checkpoint), path, 0.6)
    lora = load_lora(path)
    assert all(m.magnitude is not None for m in lora.modules.values())
    patch = lora_patch([(lora, 0.6, 0.6)], TINY_SD1, shapes_of(tiny_checkpoint))
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, patch)
    assert_state_dicts_equal(ours_unet, ref.unet.state_dict())
    assert_state_dicts_equal(ours_clip, merged_by_peft(pipe.text_encoder, 0.6))


def test_peft_dora_on_bigg_attention_rescales_each_of_q_k_v_alone(peft, sdxl_file, tmp_path):  # noqa: F811
    """bigG's q/k/v are row blocks of one fused weight: DoRA's per-row norms stay within each block."""
    from diffusers import StableDiffusionXLPipeline

    pipe = sdxl_pipe(sdxl_file)
    te2, config = add_dora(peft, pipe.text_encoder_2, ["q_proj", "v_proj", "fc2"], 3)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, weight_name="dora.safetensors", text_encoder_2_lora_layers=te2,
        text_encoder_2_lora_adapter_metadata=config,
    )  # fmt: skip
    path = str(tmp_path / "dora.safetensors")
    patch = lora_patch([(load_lora(path), 1.3, 0.0)], TINY_SDXL, shapes_of(sdxl_file))
    assert all(k.startswith(SDXL_BIGG_PREFIX) for k in patch.keys)
    patched = tmp_path / "patched.safetensors"
    save_file({k: patch(k, v) for k, v in load_file(sdxl_file).items()}, str(patched))
    assert_state_dicts_equal(
        sdxl_pipe(str(patched)).text_encoder_2.state_dict(), merged_by_peft(pipe.text_encoder_2, 1.3)
    )


def test_dora_without_its_magnitudes_or_with_lycoris_scales_is_refused(tmp_path):
    factors = {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.ones(32, 2)}
    path = tmp_path / "dora.safetensors"
    save_file(factors, str(path), metadata={"lora_adapter_metadata": '{"unet.use_dora": true, "unet.lora_alpha": 2}'})
    with pytest.raises(LoraError, match="use_dora.*'unet.conv_in' has no lora_magnitude_vector"):
        load_lora(path)
    lycoris = {
        "m.lora_down.weight": torch.ones(2, 4),
        "m.lora_up.weight": torch.ones(4, 2),
        "m.dora_scale": torch.ones(1, 4),
    }
    save_file(lycoris, str(path))
    with pytest.raises(LoraError, match=r"LyCORIS DoRA \(dora_scale\) LoRAs are not supported yet \('m.dora_scale'\)"):
        load_lora(path)
    save_file({**factors, "unet.conv_in.lora_magnitude_vector": torch.ones(31)}, str(path))
    with pytest.raises(LoraError, match="do not fit together"):
        load_lora(path)
