"""LoRA on SDXL equals the reference: diffusers' `StableDiffusionXLPipeline.load_lora_weights` + `fuse_lora`.

Random LoRA files are named from the reference pipeline's own modules (kohya-ss's diffusers-derived names,
`lora_te1_`/`lora_te2_` for the two text encoders) or from the checkpoint's keys (kohya-ss's original-layout
UNet names, which SDXL LoRAs use), so the test does not borrow our conversion table. Our patched checkpoint,
converted by diffusers' single-file code, must hold the reference's fused weights: in particular bigG's
q/k/v LoRAs land in row blocks of OpenCLIP's fused `in_proj_weight`. Every module has the same rank and
alpha, since diffusers applies a kohya file's most common alpha to its text-encoder and attention layers.
"""

import pytest
import torch
from conftest import TINY_SD1, run_cli, tiny_state_dict, write_checkpoint
from safetensors.torch import load_file, save_file
from test_lora_cli import generate
from test_sdxl import TINY_SDXL, reference_sdxl_pipeline

from sdcli.errors import LoraError
from sdcli.families import SDXL_BIGG_PREFIX, UNET_PREFIX
from sdcli.lora import load_lora, lora_patch

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_file(tiny_state_dict(TINY_SDXL, seed=3) | {SDXL_BIGG_PREFIX + "logit_scale": torch.tensor(4.6)}, str(path))
    return str(path)


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="peft (a test extra) is needed for diffusers' load_lora_weights")


def reference_pipe(checkpoint: str):
    from reference import sd15_ddim_scheduler

    return reference_sdxl_pipeline(checkpoint, sd15_ddim_scheduler())


def adapted_modules(pipe, unet: bool = True):
    """(kohya prefix, diffusers module name, weight shape) of every Linear and Conv2d a LoRA may adapt.

    transformers 5 names CLIPTextModel's modules without `text_model.` (CLIPTextModelWithProjection keeps it):
    kohya files always have it. bigG's `text_projection` is no LoRA target of kohya-ss or diffusers.
    diffusers' kohya reader has no spelling of `add_embedding` in diffusers' names (kohya's SDXL files use the
    original `label_emb`), so it is left out of these files.
    """
    networks = [("lora_te1_", pipe.text_encoder, "text_model."), ("lora_te2_", pipe.text_encoder_2, "")]
    if unet:
        networks.insert(0, ("lora_unet_", pipe.unet, ""))
    for prefix, model, name_prefix in networks:
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if name == "text_projection" or name.startswith("add_embedding."):
                continue
            yield prefix, name_prefix + name, tuple(module.weight.shape)


def lora_factors(shape, rank, g):
    """LoRA down/up for a weight: LoCon (kh x kw down, 1x1 up) on convolutions, plain matrices on Linear."""
    kernel = shape[2:]
    down = torch.randn(rank, shape[1], *kernel, generator=g) * 0.2
    return down, torch.randn(shape[0], rank, *(1 for _ in kernel), generator=g) * 0.2


def add_module(sd: dict, module: str, shape, rank: int, alpha: float, g) -> None:
    sd[f"{module}.lora_down.weight"], sd[f"{module}.lora_up.weight"] = lora_factors(shape, rank, g)
    sd[f"{module}.alpha"] = torch.tensor(alpha)


def write_kohya(pipe, checkpoint: str, path, layout: str, seed: int, rank: int = 4, alpha: float = 3.0) -> str:
    """A kohya-ss file adapting both text encoders and the UNet, in diffusers' names ("diffusers") or in the
    checkpoint's original names ("original", as kohya-ss's SDXL trainer writes them: label_emb included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, name, shape in adapted_modules(pipe, unet=layout == "diffusers"):
        add_module(sd, prefix + name.replace(".", "_"), shape, rank, alpha, g)
    if layout == "original":
        for key, tensor in load_file(checkpoint).items():
            if key.startswith(UNET_PREFIX) and key.endswith(".weight") and tensor.ndim > 1:
                module = "lora_unet_" + key[len(UNET_PREFIX) : -len(".weight")].replace(".", "_")
                add_module(sd, module, tuple(tensor.shape), rank, alpha, g)
        assert "lora_unet_label_emb_0_0.alpha" in sd and "lora_unet_time_embed_0.alpha" in sd
    save_file(sd, str(path))
    return str(path)


def write_peft(checkpoint: str, path, seed: int) -> str:
    """A diffusers/PEFT file as diffusers saves one: peft adapters on the UNet and both text encoders with
    random factors, alphas (one per network, and an alpha_pattern) in the file's metadata."""
    import peft
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = reference_pipe(checkpoint)
    torch.manual_seed(seed)  # peft draws the random factors from the global generator
    unet_config = LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, alpha_pattern={"attn2.to_k": 12},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "time_emb_proj", "linear_1", "linear_2"],
    )  # fmt: skip
    te_configs = [
        LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]),
        LoraConfig(r=3, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "out_proj", "fc2"]),
    ]
    pipe.unet.add_adapter(unet_config)
    layers = []
    for config, encoder in zip(te_configs, (pipe.text_encoder, pipe.text_encoder_2), strict=True):
        peft.inject_adapter_in_model(config, encoder)
        layers.append(get_peft_model_state_dict(encoder))
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=layers[0], text_encoder_2_lora_layers=layers[1],
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_configs[0].to_dict(),
        text_encoder_2_lora_adapter_metadata=te_configs[1].to_dict(),
    )  # fmt: skip
    return str(path)


def fused_reference(checkpoint: str, loras):
    """diffusers' SDXL pipeline after loading each (path, weight) LoRA and fusing it; a weight is a number or
    {"unet": w, "text_encoder": w, "text_encoder_2": w}."""
    pipe = reference_pipe(checkpoint)
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe


def patched_pipe(checkpoint: str, patch, path) -> object:
    """The reference pipeline on our patched checkpoint: our merge, converted by diffusers' single-file code."""
    save_file({k: patch(k, v) for k, v in load_file(checkpoint).items()}, str(path))
    return reference_pipe(str(path))


def assert_same_networks(ours, ref) -> None:
    for network in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, network).state_dict(), getattr(ref, network).state_dict()
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{network}.{key}")


def shapes_of(checkpoint: str) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(checkpoint).items()}


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_kohya_sdxl_lora_equals_diffusers_fuse(peft, sdxl_file, tmp_path, layout):
    pipe = reference_pipe(sdxl_file)
    path = write_kohya(pipe, sdxl_file, tmp_path / "xl.safetensors", layout, seed=1)
    ref = fused_reference(sdxl_file, [(path, 0.7)])
    patch = lora_patch([(load_lora(path), 0.7, 0.7)], TINY_SDXL, shapes_of(sdxl_file))
    assert_same_networks(patched_pipe(sdxl_file, patch, tmp_path / "patched.safetensors"), ref)
    # bigG's q, k and v each changed one third of the fused projection: one key per layer, three terms.
    fused = [k for k in patch.keys if k.startswith(SDXL_BIGG_PREFIX) and k.endswith("in_proj_weight")]
    assert len(fused) == TINY_SDXL.text_encoders[1].config.layers
    assert {tuple(sorted(rows for *_, rows in patch.terms[k])) for k in fused} == {((0, 3), (1, 3), (2, 3))}
    if layout == "original":
        assert {UNET_PREFIX + "label_emb.0.0.weight", UNET_PREFIX + "time_embed.2.weight"} <= patch.keys


def test_peft_sdxl_lora_and_a_stacked_kohya_one_equal_diffusers(peft, sdxl_file, tmp_path):
    peft_file = write_peft(sdxl_file, tmp_path / "peft.safetensors", seed=3)
    kohya = write_kohya(reference_pipe(sdxl_file), sdxl_file, tmp_path / "k.safetensors", "original", seed=4, rank=2)
    ref = fused_reference(
        sdxl_file,
        [
            (peft_file, {"unet": 0.8, "text_encoder": -0.5, "text_encoder_2": -0.5}),
            (kohya, {"unet": 0.4, "text_encoder": 1.2, "text_encoder_2": 1.2}),
        ],
    )
    loras = [(load_lora(peft_file), -0.5, 0.8), (load_lora(kohya), 1.2, 0.4)]
    patch = lora_patch(loras, TINY_SDXL, shapes_of(sdxl_file))
    assert_same_networks(patched_pipe(sdxl_file, patch, tmp_path / "patched.safetensors"), ref)
    assert any(k.startswith(UNET_PREFIX + "label_emb.") for k in patch.keys)  # PEFT's add_embedding.linear_1


def test_cli_with_an_sdxl_lora_equals_diffusers_fused_pipeline(peft, sdxl_file, tmp_path):
    import numpy as np
    from test_lora_cli import CFG, SEED, SIZE, STEPS

    path = write_kohya(reference_pipe(sdxl_file), sdxl_file, tmp_path / "xl.safetensors", "original", seed=5)
    pipe = reference_pipe(sdxl_file)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    expected = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    plain = generate(sdxl_file, tmp_path / "plain.png", PROMPT)
    ours = generate(sdxl_file, tmp_path / "ours.png", PROMPT, "--lora", f"{path}:0.8")
    assert np.abs(ours - expected).mean() < 1 / 255
    assert np.abs(plain - expected).mean() > 4 / 255  # the LoRA changes the image well beyond the tolerance


def test_sd1_lora_on_sdxl_and_sdxl_lora_on_sd1_are_one_line_errors_naming_the_file(sdxl_file, tmp_path):
    from test_lora import reference_pipe as sd1_pipe
    from test_lora import write_kohya_lora

    sd1 = write_checkpoint(TINY_SD1, tmp_path / "sd1.safetensors")
    sd1_lora = write_kohya_lora(sd1_pipe(sd1), tmp_path / "sd1-lora.safetensors", seed=6)
    xl_lora = write_kohya(reference_pipe(sdxl_file), sdxl_file, tmp_path / "xl-lora.safetensors", "original", seed=7)
    with pytest.raises(LoraError, match="sd1-lora.safetensors"):
        lora_patch([(load_lora(sd1_lora), 1.0, 1.0)], TINY_SDXL, shapes_of(sdxl_file))
    for checkpoint, lora in ((sdxl_file, sd1_lora), (sd1, xl_lora)):
        out = tmp_path / "out.png"
        result = run_cli("txt2img", "a cat", "-m", checkpoint, "-W", 64, "-H", 64, "--steps", 1, "--lora", lora,
                         "-o", out)  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert str(lora) in lines[0] and not out.exists()


def test_a_q_k_or_v_change_of_the_wrong_width_names_the_rows_it_would_change(sdxl_file, tmp_path):
    module = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"  # full-size bigG: 1280 wide, here 64
    path = tmp_path / "big.safetensors"
    save_file(
        {f"{module}.lora_down.weight": torch.ones(2, 1280), f"{module}.lora_up.weight": torch.ones(1280, 2)}, path
    )
    key = SDXL_BIGG_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(
        LoraError, match=rf"big.safetensors: .*\(1280, 1280\) .*'{key}' is \(192, 64\) \(its rows 64:128\)"
    ):
        lora_patch([(load_lora(path), 1.0, 1.0)], TINY_SDXL, shapes_of(sdxl_file))


def test_switching_sdxl_lora_sets_equals_a_fresh_load(sdxl_file, tmp_path):
    """Re-reading the weights a set changes works on bigG's fused projections and the label embedding too."""
    from pathlib import Path

    from sdcli.checkpoint import load_model
    from sdcli.extra_networks import LoraRef
    from sdcli.lora_sets import ActiveLoras, LoraLibrary

    pipe = reference_pipe(sdxl_file)
    write_kohya(pipe, sdxl_file, tmp_path / "a.safetensors", "original", seed=8)
    write_kohya(pipe, sdxl_file, tmp_path / "b.safetensors", "diffusers", seed=9, rank=2)
    library = LoraLibrary(tmp_path, Path(sdxl_file))
    first = (LoraRef("a", 0.5, 0.7, tmp_path / "a.safetensors"),)
    second = (LoraRef("b", -1.0, 0.3, tmp_path / "b.safetensors"),)
    model = load_model(sdxl_file, patch=library.patch(first))
    ActiveLoras(library, model, first).use(second)
    fresh = load_model(sdxl_file, patch=library.patch(second))
    for ours, theirs in zip((*model.text_encoders, model.unet), (*fresh.text_encoders, fresh.unet), strict=True):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
