"""Loading single-file checkpoints: dtypes, extras real files carry, and a clear error for each bad file."""

import pytest
import torch
from conftest import TINY_SD1, tiny_state_dict
from safetensors.torch import save_file

import sdcli.checkpoint
from sdcli.checkpoint import TensorReader, load_model, skipped_initialisers
from sdcli.errors import CheckpointError
from sdcli.families import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, detect
from sdcli.header import read_header

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write(tmp_path, state_dict, name="model.safetensors"):
    path = tmp_path / name
    save_file(state_dict, str(path))
    return path


def test_detect_reads_tiny_family_from_shapes(tiny_checkpoint):
    shapes = {k: v.shape for k, v in read_header(tiny_checkpoint).items()}
    assert detect(shapes) == TINY_SD1


def test_load_ignores_extras_and_holds_the_file_weights(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    sd = tiny_state_dict(TINY_SD1)
    for prefix, module in ((UNET_PREFIX, model.unet), (VAE_PREFIX, model.vae), (CLIP_PREFIX, model.text_encoder)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, sd[prefix + k]), prefix + k
    assert model.family == TINY_SD1
    assert not any(p.requires_grad for p in model.unet.parameters())


@pytest.mark.parametrize("file_dtype", sorted(DTYPES))
@pytest.mark.parametrize("model_dtype", sorted(DTYPES))
def test_load_casts_any_file_dtype_to_any_model_dtype(tmp_path, file_dtype, model_dtype):
    sd = tiny_state_dict(TINY_SD1)
    # Real files mix dtypes: half-precision weights next to int64 and fp64 buffers.
    stored = {k: v.to(DTYPES[file_dtype]) for k, v in sd.items()}
    stored[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    stored["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    model = load_model(write(tmp_path, stored), dtype=DTYPES[model_dtype])
    for module in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in module.parameters()} == {DTYPES[model_dtype]}
    key = "input_blocks.1.0.in_layers.2.weight"
    expected = sd[UNET_PREFIX + key].to(DTYPES[file_dtype]).to(DTYPES[model_dtype])
    assert torch.equal(model.unet.state_dict()[key], expected)
    with torch.no_grad():
        out = model.unet(
            torch.randn(1, 4, 8, 8, dtype=DTYPES[model_dtype]),
            torch.tensor([10.0]),
            torch.randn(1, 77, 128, dtype=DTYPES[model_dtype]),
        )
    assert out.dtype == DTYPES[model_dtype] and torch.isfinite(out).all()


def special_values(shape, dtype):
    """Random values of `dtype` with infinities, NaN, signed zeros, subnormals and rounding ties mixed in."""
    n = torch.Size(shape).numel()
    values = torch.randn(n) * torch.logspace(-9, 4, steps=n)
    specials = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 6e-8, -1e-40, 1 + 2**-8, 65504.0]
    values[: len(specials)] = torch.tensor(specials[:n])
    return values.view(shape).to(dtype)


@pytest.mark.parametrize(
    ("file_dtype", "model_dtype"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)]
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_half_to_half_casts_through_fp32_give_the_direct_casts_bits(
    tmp_path, monkeypatch, file_dtype, model_dtype, memory_format
):
    # A tiny buffer, so tensors span many blocks; rows of 100 do not fit and take the direct copy.
    monkeypatch.setattr(sdcli.checkpoint, "SCRATCH_ELEMENTS", 64)
    shapes = {
        "scalar": (),
        "vector": (333,),
        "rows": (5, 100),
        "conv": (7, 3, 2, 2),
        "one": (1, 4, 1, 1),
        "empty": (0, 3),
    }
    stored = {name: special_values(shape, file_dtype) for name, shape in shapes.items()}
    path = write(tmp_path, stored)
    infos = read_header(path)
    with TensorReader(path) as reader:
        for name, value in stored.items():
            loaded = reader.read(infos[name], model_dtype, "cpu", memory_format)
            expected = value.to(model_dtype)
            # Bit for bit (signed zeros, subnormals, ties), except that a NaN may come back as another NaN.
            assert torch.equal(loaded.isnan(), expected.isnan()), name
            assert torch.equal(loaded.nan_to_num(0.0).view(torch.int16), expected.nan_to_num(0.0).view(torch.int16))
            if loaded.dim() == 4:
                assert loaded.is_contiguous(memory_format=memory_format)


def test_cpu_models_hold_convolutions_channels_last(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.unet.input_blocks[0][0].weight.stride()[1] == 1


def test_initialisers_are_skipped_only_while_building():
    weight = torch.full((3, 3), 5.0)
    with pytest.raises(RuntimeError), skipped_initialisers():
        assert torch.equal(torch.nn.init.kaiming_uniform_(weight), torch.full((3, 3), 5.0))
        raise RuntimeError("the originals come back even after an error")
    torch.nn.init.zeros_(weight)
    assert torch.equal(weight, torch.zeros(3, 3))


def test_missing_key_names_file_component_and_key(tmp_path):
    sd = tiny_state_dict(TINY_SD1)
    del sd[VAE_PREFIX + "decoder.conv_out.bias"]
    path = write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: AutoencoderKL: missing first_stage_model\.decoder"):
        load_model(path)


def test_wrong_shape_is_reported_with_both_shapes(tmp_path):
    sd = tiny_state_dict(TINY_SD1)
    sd[UNET_PREFIX + "time_embed.2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"UNetModel: wrong shape for .*time_embed\.2\.bias \(7,\) \(expected"):
        load_model(write(tmp_path, sd))


def test_truncated_file_is_reported(tmp_path, tiny_checkpoint):
    data = open(tiny_checkpoint, "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_suffix_is_refused_without_opening(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not even read")
    with pytest.raises(CheckpointError, match="pickle.*never"):
        load_model(path)


def test_pickle_content_under_safetensors_name_is_refused(tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.zeros(1)}, path)  # a zip container holding a pickle
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no such model file.*sdcli download"):
        load_model(tmp_path / "absent.safetensors")


def test_a_file_without_a_unet_is_named_in_the_error():  # other families: tests/test_families.py
    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet"):
        detect({"encoder.weight": (3,)})


def all_weights(model) -> dict[str, torch.Tensor]:
    parts = ((UNET_PREFIX, model.unet), (VAE_PREFIX, model.vae), (CLIP_PREFIX, model.text_encoder))
    return {prefix + k: v for prefix, module in parts for k, v in module.state_dict().items()}


def test_load_patch_changes_exactly_the_weight_it_patches(tmp_path):
    sd = {k: v.half() for k, v in tiny_state_dict(TINY_SD1).items()}  # fp16 in the file, fp32 in the model
    path = write(tmp_path, sd)
    target = UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight"
    seen = {}

    def add_one(key: str, tensor: torch.Tensor) -> torch.Tensor:
        seen[key] = tensor.dtype
        return tensor + 1 if key == target else tensor

    plain, patched = load_model(path), load_model(path, patch=add_one)
    assert set(seen) == set(sd) and set(seen.values()) == {torch.float16}  # every key, in the file's dtype
    before, after = all_weights(plain), all_weights(patched)
    assert set(before) == set(after) == set(sd)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [target]
    assert torch.equal(after[target], (sd[target] + 1).float())  # applied before the cast


def test_load_patch_may_not_change_a_shape(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match=r"changed .*time_embed\.0\.bias"):
        load_model(tiny_checkpoint, patch=lambda key, t: t[:1] if key.endswith("time_embed.0.bias") else t)
