"""LoRA merging equals the reference: diffusers' own `load_lora_weights` + `fuse_lora` on the same checkpoint.

Random LoRA files for the tiny SD 1.x checkpoint are named from the reference models' own modules (so
the test does not borrow our conversion table); our patched checkpoint goes through diffusers'
single-file conversion and must equal the reference's fused weights within fp32 rounding. Where
diffusers differs by design (a kohya file's per-module alphas, LyCORIS), the expected weights come from
the written formula or from peft's LoHa/LoKr layers.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SD1
from reference import reference_clip, reference_unet
from safetensors.torch import load_file, save_file

from sdcli.errors import CheckpointError, LoraError
from sdcli.families import CLIP_PREFIX, UNET_PREFIX
from sdcli.lora import LoraModule, checkpoint_lora_patch, load_lora, lora_patch


@pytest.fixture
def peft():
    """peft: diffusers' load_lora_weights needs it, and its LyCORIS layers are the LoHa/LoKr reference."""
    return pytest.importorskip("peft", reason="peft (a test extra) is needed for diffusers' load_lora_weights")


def reference_pipe(checkpoint):
    from diffusers import StableDiffusionPipeline
    from reference import reference_pipeline

    return reference_pipeline(StableDiffusionPipeline, checkpoint, TINY_SD1)


def adapted_modules(pipe):
    """(kohya prefix, diffusers name, weight shape) of every Linear and Conv2d the reference pipeline has."""
    for prefix, model, name_prefix in (("lora_unet_", pipe.unet, ""), ("lora_te_", pipe.text_encoder, "text_model.")):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                yield prefix, name_prefix + name, tuple(module.weight.shape)


def random_lora_factors(shape, rank, g):
    """LoRA down/up for a weight: LoCon (kh x kw down, 1x1 up) on convolutions, plain matrices on Linear."""
    kernel = shape[2:]
    down = torch.randn(rank, shape[1], *kernel, generator=g) * 0.2
    return down, torch.randn(shape[0], rank, *(1 for _ in kernel), generator=g) * 0.2


def write_kohya_lora(pipe, path, seed, rank=4, alpha=lambda i: 3.0):
    """A kohya-ss file adapting every Linear/Conv2d, named from diffusers' module names; alpha(i) per module."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (prefix, name, shape) in enumerate(adapted_modules(pipe)):
        module = prefix + name.replace(".", "_")
        sd[f"{module}.lora_down.weight"], sd[f"{module}.lora_up.weight"] = random_lora_factors(shape, rank, g)
        sd[f"{module}.alpha"] = torch.tensor(alpha(i))
    save_file(sd, str(path))
    return str(path)


def fused_reference(checkpoint, loras):
    """diffusers' UNet and CLIP state dicts after loading each (path, weight) LoRA and fusing them.

    A weight is a number, or {"unet": w, "text_encoder": w} for separate weights per network.
    """
    pipe = reference_pipe(checkpoint)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def patched_state_dicts(checkpoint, patch):
    """Our patch applied to every tensor of the checkpoint, converted by diffusers' single-file code."""
    sd = {k: patch(k, v) for k, v in load_file(checkpoint).items()}

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = reference_unet(part(UNET_PREFIX), TINY_SD1.unet, TINY_SD1.vae).state_dict()
    clip = reference_clip(part(CLIP_PREFIX), TINY_SD1.text_encoders[0].config).state_dict()
    return unet, clip


def shapes_of(checkpoint):
    return {k: tuple(v.shape) for k, v in load_file(checkpoint).items()}


def assert_state_dicts_equal(ours, ref):
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_kohya_lora_with_locon_convs_equals_diffusers_fuse(peft, tiny_checkpoint, tmp_path):
    pipe = reference_pipe(tiny_checkpoint)
    path = write_kohya_lora(pipe, tmp_path / "style.safetensors", seed=1)
    ref_unet, ref_clip = fused_reference(tiny_checkpoint, [(path, 0.7)])
    patch = lora_patch([(load_lora(path), 0.7, 0.7)], TINY_SD1, shapes_of(tiny_checkpoint))
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, patch)
    assert_state_dicts_equal(ours_unet, ref_unet)
    assert_state_dicts_equal(ours_clip, ref_clip)
    # Every UNet and CLIP Linear/Conv2d weight changed, and nothing else (VAE, norms, biases).
    n_modules = len(list(adapted_modules(pipe)))
    assert len(patch.keys) == n_modules
    assert all(k.endswith(".weight") for k in patch.keys)


def test_kohya_lora_in_the_original_layout_equals_diffusers_fuse(peft, tiny_checkpoint, tmp_path):
    """SDXL-style kohya names (`lora_unet_input_blocks_1_1_...`): diffusers maps them with its own sgm code."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    g = torch.Generator().manual_seed(2)
    sd = {}
    for key, shape in shapes_of(tiny_checkpoint).items():
        # diffusers' sgm mapping reads index 1 of an output block as attention, but in a level without attention
        # it is the upsampler (`output_blocks.1.1.conv`): left out here, its name is checked in test_convert.py.
        upsampler_at_1 = re.search(r"output_blocks\.\d+\.1\.conv\.", key)
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) > 1 and not upsampler_at_1:
            module = "lora_unet_" + key[len(UNET_PREFIX) : -len(".weight")].replace(".", "_")
            sd[f"{module}.lora_down.weight"], sd[f"{module}.lora_up.weight"] = random_lora_factors(shape, 2, g)
            sd[f"{module}.alpha"] = torch.tensor(1.5)
    path = tmp_path / "sgm.safetensors"
    save_file(sd, str(path))
    pipe = reference_pipe(tiny_checkpoint)
    diffusers_named = _maybe_map_sgm_blocks_to_diffusers(dict(sd), pipe.unet.config)
    renamed = tmp_path / "renamed.safetensors"
    save_file(diffusers_named, str(renamed))
    ref_unet, _ = fused_reference(tiny_checkpoint, [(str(renamed), -0.6)])
    patch = lora_patch([(load_lora(path), 1.0, -0.6)], TINY_SD1, shapes_of(tiny_checkpoint))
    assert_state_dicts_equal(patched_state_dicts(tiny_checkpoint, patch)[0], ref_unet)


def write_peft_lora(checkpoint, path, seed, transformers_names=True):
    """A diffusers/PEFT file as diffusers saves one: peft adapters with random factors, alpha in the metadata."""
    import peft
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = reference_pipe(checkpoint)
    torch.manual_seed(seed)  # peft draws the random factors from the global generator
    unet_config = LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, alpha_pattern={"proj_in": 2.0, "attn2.to_k": 12},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
    )  # fmt: skip
    te_config = LoraConfig(
        r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
    )
    pipe.unet.add_adapter(unet_config)
    peft.inject_adapter_in_model(te_config, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    te_layers = get_peft_model_state_dict(pipe.text_encoder)
    if transformers_names:  # as transformers 4 named CLIP, which most files in the wild were saved with
        te_layers = {"text_model." + k: v for k, v in te_layers.items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp := path.parent, weight_name=path.name,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet), text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )  # fmt: skip
    assert (tmp / path.name).is_file()
    return str(path)


@pytest.mark.parametrize("transformers_names", [False, True])
def test_peft_lora_with_alpha_metadata_equals_diffusers_fuse(peft, tiny_checkpoint, tmp_path, transformers_names):
    path = write_peft_lora(tiny_checkpoint, tmp_path / "peft.safetensors", 3, transformers_names)
    lora = load_lora(path)
    assert {m.alpha for name, m in lora.modules.items() if name.endswith("proj_in")} == {2.0}  # alpha_pattern
    assert {m.alpha for name, m in lora.modules.items() if name.startswith("text_encoder.")} == {5.0}
    ref_unet, ref_clip = fused_reference(tiny_checkpoint, [(path, 0.8)])
    patch = lora_patch([(load_lora(path), 0.8, 0.8)], TINY_SD1, shapes_of(tiny_checkpoint))
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, patch)
    assert_state_dicts_equal(ours_unet, ref_unet)
    assert_state_dicts_equal(ours_clip, ref_clip)
    assert len([k for k in patch.keys if k.startswith(CLIP_PREFIX)]) == 2 * 5  # 2 layers, 5 adapted Linear each


def test_kohya_lora_with_alphas_differing_per_module_follows_the_formula(peft, tiny_checkpoint, tmp_path):
    """W + w * (alpha / rank) * up @ down per module: alpha / rank is linear in up, so folding each module's alpha
    into its up matrix under one common alpha gives a file diffusers fuses exactly (it applies a file's most
    common alpha to some modules); ours must merge the per-module file to the same weights."""
    pipe = reference_pipe(tiny_checkpoint)
    alphas = [0.5 + (i % 5) for i in range(len(list(adapted_modules(pipe))))]
    path = write_kohya_lora(pipe, tmp_path / "varied.safetensors", seed=4, alpha=lambda i: alphas[i])
    folded = load_file(path)
    for key in [k for k in folded if k.endswith(".alpha")]:
        module = key.removesuffix(".alpha")
        folded[f"{module}.lora_up.weight"] = folded[f"{module}.lora_up.weight"] * (folded[key] / 2.0)
        folded[key] = torch.tensor(2.0)
    save_file(folded, str(tmp_path / "folded.safetensors"))
    ref_unet, ref_clip = fused_reference(tiny_checkpoint, [(str(tmp_path / "folded.safetensors"), 1.3)])
    patch = lora_patch([(load_lora(path), 1.3, 1.3)], TINY_SD1, shapes_of(tiny_checkpoint))
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, patch)
    assert_state_dicts_equal(ours_unet, ref_unet)
    assert_state_dicts_equal(ours_clip, ref_clip)


def test_two_stacked_loras_with_separate_network_weights_equal_diffusers(peft, tiny_checkpoint, tmp_path):
    kohya = write_kohya_lora(reference_pipe(tiny_checkpoint), tmp_path / "a.safetensors", seed=5, rank=3)
    peft_file = write_peft_lora(tiny_checkpoint, tmp_path / "b.safetensors", seed=6)
    ref_unet, ref_clip = fused_reference(
        tiny_checkpoint, [(kohya, {"unet": 0.6, "text_encoder": 0.9}), (peft_file, {"unet": -0.4, "text_encoder": 0.3})]
    )
    loras = [(load_lora(kohya), 0.9, 0.6), (load_lora(peft_file), 0.3, -0.4)]
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, lora_patch(loras, TINY_SD1, shapes_of(tiny_checkpoint)))
    assert_state_dicts_equal(ours_unet, ref_unet)
    assert_state_dicts_equal(ours_clip, ref_clip)


LYCORIS_TARGETS = {  # our key -> the kohya module name of the same weight (diffusers' name, '.' -> '_')
    UNET_PREFIX
    + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",  # noqa: E501
    UNET_PREFIX + "input_blocks.3.0.in_layers.2.weight": "lora_unet_down_blocks_1_resnets_0_conv1",
    UNET_PREFIX + "input_blocks.3.0.skip_connection.weight": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
    CLIP_PREFIX + "text_model.encoder.layers.1.mlp.fc1.weight": "lora_te_text_model_encoder_layers_1_mlp_fc1",
}


def peft_layer(peft, config, weight):
    """A peft LyCORIS layer around a Linear/Conv2d holding `weight`, its factors drawn at random."""
    base = (
        torch.nn.Linear(weight.shape[1], weight.shape[0])
        if weight.ndim == 2
        else torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:])
    )  # noqa: E501
    model = torch.nn.Sequential(base)
    peft.inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(weight.numel())
    with torch.no_grad():
        for name, p in model[0].named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model[0]


@pytest.mark.parametrize(
    "part, config",
    [
        ("hada_w1_a", lambda peft: peft.LoHaConfig(r=3, alpha=5, target_modules=["0"])),
        ("lokr_w2_b", lambda peft: peft.LoKrConfig(r=2, alpha=3, target_modules=["0"])),  # w1 full, w2 = w2_a @ w2_b
        # Both Kronecker factors full: LyCORIS applies no alpha (diffusers' _bake_lokr_alpha_ too), peft always
        # divides by r, so alpha = r makes the two agree.
        ("lokr_w2", lambda peft: peft.LoKrConfig(r=64, alpha=64, target_modules=["0"])),
        # Tucker cores on the 3x3 convolution (LyCORIS' use_tucker / peft's use_effective_conv2d).
        ("hada_t1", lambda peft: peft.LoHaConfig(r=3, alpha=5, target_modules=["0"], use_effective_conv2d=True)),
        ("lokr_t2", lambda peft: peft.LoKrConfig(r=2, alpha=3, target_modules=["0"], use_effective_conv2d=True)),
    ],
)
def test_lycoris_loha_and_lokr_merge_as_peft_layers_do(peft, tiny_checkpoint, tmp_path, part, config):
    checkpoint = load_file(tiny_checkpoint)
    sd, expected = {}, {}
    for key, module in LYCORIS_TARGETS.items():
        layer = peft_layer(peft, config(peft), checkpoint[key])
        for name, p in layer.named_parameters():
            if name.startswith(("hada_", "lokr_")):
                sd[f"{module}.{name.removesuffix('.default')}"] = p.detach().clone()
        sd[f"{module}.alpha"] = torch.tensor(float(config(peft).alpha))
        expected[key] = checkpoint[key] + 0.75 * layer.get_delta_weight("default").detach()
    assert any(k.endswith("." + part) for k in sd)
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    patch = lora_patch([(load_lora(tmp_path / "lyco.safetensors"), 0.75, 0.75)], TINY_SD1, shapes_of(tiny_checkpoint))
    assert patch.keys == set(LYCORIS_TARGETS)
    for key, weight in expected.items():
        torch.testing.assert_close(patch(key, checkpoint[key]), weight, rtol=1e-5, atol=1e-6)


def test_tucker_locon_delta_is_the_composed_convolution():
    """Tucker LoCon runs up(mid(down(x))): a 1x1, a kh x kw and a 1x1 convolution, with no nonlinearity between,
    so they compose into one kh x kw kernel; the merged change must give the same output as the three convs."""
    g = torch.Generator().manual_seed(7)
    down, mid, up = (torch.randn(*s, generator=g) for s in ((3, 8, 1, 1), (4, 3, 3, 3), (6, 4, 1, 1)))
    module = LoraModule("lora", {"down": down, "mid": mid, "up": up}, alpha=2.0)
    assert module.delta_shape() == (6, 8 * 9)
    x = torch.randn(2, 8, 7, 9, generator=g)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (2.0 / 3)  # alpha / rank (down's 3)
    merged = F.conv2d(x, module.delta().reshape(6, 8, 3, 3), padding=1)
    torch.testing.assert_close(merged, composed, rtol=1e-5, atol=1e-5)


def write_tensors(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def test_patch_leaves_other_keys_untouched_and_returns_the_merge_in_fp32(tiny_checkpoint, tmp_path):
    key = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"  # SD 1.x's 1x1-conv projection, LoRA'd as Linear
    w = load_file(tiny_checkpoint)[key]
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    path = write_tensors(tmp_path / "one.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down.half(),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up.half(),
    })  # fmt: skip
    patch = lora_patch([(load_lora(path), 0.0, 0.5)], TINY_SD1, shapes_of(tiny_checkpoint))
    assert patch.keys == {key}
    other = torch.ones(3)
    assert patch("model.diffusion_model.out.2.weight", other) is other
    merged = patch(key, w.half())
    assert merged.dtype == torch.float32  # the loader casts it once to the model's dtype: no fp16 rounding first
    expected = w.half().float() + 0.5 * (up.half().float() @ down.half().float()).reshape(w.shape)  # no alpha: scale 1
    torch.testing.assert_close(merged, expected)
    assert lora_patch([(load_lora(path), 1.0, 0.0)], TINY_SD1, shapes_of(tiny_checkpoint)).keys == set()
    from_file = checkpoint_lora_patch(tiny_checkpoint, [(load_lora(path), 0.0, 0.5)])
    assert from_file.keys == {key} and torch.equal(from_file(key, w), patch(key, w))


def test_an_integer_alpha_scales_like_a_float_one(tiny_checkpoint, tmp_path):
    key = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
    w = load_file(tiny_checkpoint)[key]
    down, up = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    path = write_tensors(tmp_path / "int.safetensors", {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up,
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4),  # int64, as some converters write it
    })  # fmt: skip
    patch = lora_patch([(load_lora(path), 1.0, 1.0)], TINY_SD1, shapes_of(tiny_checkpoint))
    expected = w + (4 / 2) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(patch(key, w), expected)


def test_patch_copies_fp32_and_channels_last_weights_instead_of_writing_to_them(tiny_checkpoint, tmp_path):
    key = UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight"  # a 3x3 convolution
    w = load_file(tiny_checkpoint)[key]
    down, up = torch.randn(2, 32, 3, 3), torch.randn(32, 2, 1, 1)
    path = write_tensors(tmp_path / "conv.safetensors", {
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": down,
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": up,
    })  # fmt: skip
    patch = lora_patch([(load_lora(path), 1.0, 0.3)], TINY_SD1, shapes_of(tiny_checkpoint))
    expected = w + 0.3 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    for tensor in (w.clone(), w.clone().to(memory_format=torch.channels_last)):
        torch.testing.assert_close(patch(key, tensor), expected)
        assert torch.equal(tensor, w)


def test_pickle_loras_are_refused_as_pickle_checkpoints_are(tmp_path):
    path = tmp_path / "style.pt"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="pickles"):
        load_lora(path)


def test_unknown_modules_are_listed_unless_ignored(tiny_checkpoint, tmp_path):
    path = write_tensors(tmp_path / "odd.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2),
        "lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": torch.randn(2, 32),
        "lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight": torch.randn(32, 2),
        "bundle_emb.token.string_to_param.*": torch.randn(1, 32),
    })  # fmt: skip
    lora, shapes = load_lora(path), shapes_of(tiny_checkpoint)
    with pytest.raises(LoraError, match=r"odd.safetensors: 2 .*ignore-unknown") as e:
        lora_patch([(lora, 1.0, 1.0)], TINY_SD1, shapes)
    assert "lora_unet_down_blocks_9_resnets_0_conv1" in str(e.value) and "bundle_emb" in str(e.value)
    assert len(lora_patch([(lora, 1.0, 1.0)], TINY_SD1, shapes, ignore_unknown=True).keys) == 1


def test_a_lora_for_another_family_is_a_one_line_error_naming_the_file(tiny_checkpoint, tmp_path):
    # SDXL-style names that exist in SD 1.x, with SDXL's widths.
    path = write_tensors(tmp_path / "xl.safetensors", {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4),
    })  # fmt: skip
    with pytest.raises(LoraError, match=r"xl.safetensors: .*attn2.to_k.weight' is \(32, 128\).*another model") as e:
        lora_patch([(load_lora(path), 1.0, 1.0)], TINY_SD1, shapes_of(tiny_checkpoint))
    assert "\n" not in str(e.value)
    te2 = write_tensors(tmp_path / "xl2.safetensors", {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4),
    })  # fmt: skip
    with pytest.raises(LoraError, match="looks like an SDXL LoRA"):
        lora_patch([(load_lora(te2), 1.0, 1.0)], TINY_SD1, shapes_of(tiny_checkpoint))


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "m.lora_down.weight": torch.ones(2, 4),
                "m.lora_up.weight": torch.ones(4, 2),
                "m.dora_scale": torch.ones(1, 4),
            },
            "DoRA",
        ),  # noqa: E501
        ({"m.lokr_w1_a": torch.ones(4, 2), "m.lokr_t1": torch.ones(2, 2, 3, 3)}, "Tucker-decomposed first factor"),
        ({"m.lora_down.weight": torch.ones(2, 4)}, "missing tensors"),
        ({"m.lokr_w1": torch.ones(2, 2)}, "missing tensors"),
        ({"m.lora_down.weight": torch.ones(2, 4), "m.lora_up.weight": torch.ones(4, 3)}, "do not fit"),
        ({"m.alpha": torch.ones(())}, "only an alpha"),
        ({"token": torch.ones(2)}, "no LoRA tensors"),
    ],
)
def test_forms_we_cannot_merge_are_refused_by_name(tmp_path, tensors, message):
    with pytest.raises(LoraError, match=message):
        load_lora(write_tensors(tmp_path / "x.safetensors", tensors))


def legacy_attention_processor_names(sd):
    """diffusers' 2023 attention-processor layout: `attn1.processor.to_q_lora.down.weight`, no `unet.` prefix,
    CLIP attention as `self_attn.to_q_lora`, other CLIP layers as `lora_linear_layer`."""
    renamed = {}
    for key, tensor in sd.items():
        key = (
            key.removeprefix("unet.")
            .replace("lora_A.weight", "lora.down.weight")
            .replace("lora_B.weight", "lora.up.weight")
        )  # noqa: E501
        key = re.sub(r"(attn[12])\.to_(q|k|v)\.lora\.", r"\1.processor.to_\2_lora.", key)
        key = re.sub(r"(attn[12])\.to_out\.0\.lora\.", r"\1.processor.to_out_lora.", key)
        key = re.sub(r"self_attn\.(q|k|v|out)_proj\.lora\.", r"self_attn.to_\1_lora.", key)
        renamed[key.replace("mlp.fc1.lora.", "mlp.fc1.lora_linear_layer.")] = tensor
    return renamed


@pytest.mark.parametrize("layout", ["training_scripts", "attention_processors"])
def test_older_diffusers_layouts_merge_as_the_same_lora_in_peft_layout(peft, tiny_checkpoint, tmp_path, layout):
    """diffusers 0.42 itself no longer loads these layouts' SD 1.x attention weights, so the reference is the
    same tensors in the PEFT layout, fused by diffusers. Without PEFT's metadata no file has an alpha: scale 1."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    peft_sd = load_file(write_peft_lora(tiny_checkpoint, tmp_path / "peft.safetensors", seed=8))
    plain = write_tensors(tmp_path / "plain.safetensors", peft_sd)
    if layout == "training_scripts":  # what diffusers' train_*_lora.py scripts save: `.lora.down.weight`
        sd = convert_state_dict_to_diffusers(peft_sd)
        assert any(k.endswith(".lora.down.weight") for k in sd)
    else:
        sd = legacy_attention_processor_names(peft_sd)
        assert any(".processor.to_out_lora." in k for k in sd) and any(".to_q_lora." in k for k in sd)
    path = write_tensors(tmp_path / f"{layout}.safetensors", sd)
    ref_unet, ref_clip = fused_reference(tiny_checkpoint, [(str(plain), 0.9)])
    lora = load_lora(path)
    assert {m.alpha for m in lora.modules.values()} == {None}
    patch = lora_patch([(lora, 0.9, 0.9)], TINY_SD1, shapes_of(tiny_checkpoint))
    ours_unet, ours_clip = patched_state_dicts(tiny_checkpoint, patch)
    assert_state_dicts_equal(ours_unet, ref_unet)
    assert_state_dicts_equal(ours_clip, ref_clip)
