"""The name tables map every weight of our networks onto the same weight in the reference's layout, and back.

The reference side is diffusers' own single-file conversion of our state dict: on random weights each
of our tensors must land, by our table, on the diffusers parameter holding the same numbers; on the
full-size SD 1.5 layout (meta device) the names and shapes must match one to one.
"""

import re

import pytest
import torch
from conftest import SD1, TINY_SD1, TINY_UNETS, TINY_VAES, randomize_
from reference import reference_clip, reference_unet, reference_vae

from sdcli.convert import clip_table, lora_aliases, lora_targets, unet_table, vae_from_diffusers, vae_table
from sdcli.families import CLIP_PREFIX, UNET_PREFIX
from sdcli.models.clip import ClipTextModel
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL


def assert_table_maps_onto(table, ours: dict, theirs: dict, same_values: bool) -> None:
    mapped = {}
    for name, tensor in ours.items():
        their_name = table.to_diffusers(name)
        assert their_name in theirs, (name, their_name)
        assert table.from_diffusers(their_name) == name
        other = theirs[their_name]
        assert other.numel() == tensor.numel(), name  # the VAE's attention: 1x1 conv here, Linear there
        if same_values:
            assert torch.equal(other.reshape(tensor.shape), tensor), name
        mapped[their_name] = name
    assert set(mapped) == set(theirs)  # onto, and one to one since the dict has as many entries as ours


def clip_names_with_text_model(model) -> dict:
    # transformers 5 dropped the `text_model.` level that checkpoints and LoRA files still carry.
    return {"text_model." + k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_table_maps_each_tiny_weight_onto_the_reference_weight(name):
    ours = randomize_(UNetModel(TINY_UNETS[name]), seed=4).state_dict()
    ref = reference_unet(ours, TINY_UNETS[name], TINY_VAES["a"])
    assert_table_maps_onto(unet_table(TINY_UNETS[name]), ours, ref.state_dict(), same_values=True)


@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_vae_table_maps_each_tiny_weight_onto_the_reference_weight(name):
    ours = randomize_(AutoencoderKL(TINY_VAES[name]), seed=5).state_dict()
    ref = reference_vae(ours, TINY_UNETS["a"], TINY_VAES[name])
    assert_table_maps_onto(vae_table(TINY_VAES[name]), ours, ref.state_dict(), same_values=True)


def test_clip_table_maps_each_tiny_weight_onto_the_reference_weight():
    ours = randomize_(ClipTextModel(TINY_SD1.text_encoders[0].config), seed=6).state_dict()
    ref = reference_clip(ours, TINY_SD1.text_encoders[0].config)
    assert_table_maps_onto(clip_table(), ours, clip_names_with_text_model(ref), same_values=True)


def test_tables_map_the_full_size_sd15_layout_one_to_one():
    with torch.device("meta"):
        unet = UNetModel(SD1.unet).state_dict()
        vae = AutoencoderKL(SD1.vae).state_dict()
        clip = ClipTextModel(SD1.text_encoders[0].config).state_dict()
    ref_unet = reference_unet(unet, SD1.unet, SD1.vae, device="meta").state_dict()
    assert_table_maps_onto(unet_table(SD1.unet), unet, ref_unet, same_values=False)
    ref_vae = reference_vae(vae, SD1.unet, SD1.vae, device="meta").state_dict()
    assert_table_maps_onto(vae_table(SD1.vae), vae, ref_vae, same_values=False)
    ref_clip = clip_names_with_text_model(reference_clip(clip, SD1.text_encoders[0].config, device="meta"))
    assert_table_maps_onto(clip_table(), clip, ref_clip, same_values=False)


def test_names_outside_the_tables_convert_to_none():
    table = unet_table(SD1.unet)
    assert table.to_diffusers("input_blocks.99.0.in_layers.2.weight") is None
    assert table.to_diffusers("input_blocks.1.0.in_layers.7.weight") is None  # no such layer in a ResBlock
    assert table.from_diffusers("down_blocks.0.resnets.0.conv9.weight") is None
    assert table.from_diffusers("down_blocks.0.resnets.0.conv1.weight") == "input_blocks.1.0.in_layers.2.weight"


def test_lora_aliases_give_every_full_size_module_distinct_kohya_and_diffusers_names():
    with torch.device("meta"):
        keys = [UNET_PREFIX + k for k in UNetModel(SD1.unet).state_dict()]
        keys += [CLIP_PREFIX + k for k in ClipTextModel(SD1.text_encoders[0].config).state_dict()]
    weights = [k for k in keys if k.endswith(".weight")]
    aliases = lora_aliases(lora_targets(SD1), weights)
    # Each weight has its own spellings: kohya in both layouts and the dotted diffusers name(s).
    by_key: dict[str, set] = {}
    for alias, (_, key, _) in aliases.items():
        by_key.setdefault(key, set()).add(alias)
    assert set(by_key) == set(weights)
    unet_spellings = {len(v) for k, v in by_key.items() if k.startswith(UNET_PREFIX)}
    assert unet_spellings == {4}  # kohya in both layouts, diffusers' with and without `unet.`: none shared
    q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert aliases["lora_te_text_model_encoder_layers_0_self_attn_q_proj"][1] == q
    assert aliases["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"][1] == q
    assert aliases["text_encoder.encoder.layers.0.self_attn.q_proj"][1] == q
    attn = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert aliases["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"][1] == attn
    assert aliases["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"][1] == attn
    assert aliases["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1] == attn
    assert aliases["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1] == attn


@pytest.mark.parametrize("name", sorted(TINY_VAES))
@pytest.mark.parametrize("legacy", [False, True])
def test_a_diffusers_vae_converts_back_to_our_state_dict(name, legacy):
    ours = randomize_(AutoencoderKL(TINY_VAES[name]), seed=7).state_dict()
    theirs = dict(reference_vae(ours, TINY_UNETS["a"], TINY_VAES[name]).state_dict())
    if legacy:  # diffusers before 0.14 named the attention projections query/key/value/proj_attn
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        theirs = {
            re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m.group(1)]}.", k): v
            for k, v in theirs.items()
        }  # noqa: E501
        assert any(".proj_attn." in k for k in theirs)
    theirs["encoder.extra.weight"] = torch.zeros(1)
    converted, unknown = vae_from_diffusers(theirs)
    assert unknown == ["encoder.extra.weight"]
    assert converted.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(converted[key], tensor), key
