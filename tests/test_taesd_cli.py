"""--vae taesd|taesdxl|FILE: the CLI decodes (and encodes) with TAESD, equal to diffusers' AutoencoderTiny on
the same random weights and the same latents; the names find either file layout in the weights folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_, run_cli
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file
from test_taesd import original_layout

import sdcli.checkpoint
import sdcli.pipeline
import sdcli.tiling
from sdcli.images import from_pil
from sdcli.model_specs import resolve_spec
from sdcli.vae_choice import is_taesd


@pytest.fixture(scope="module")
def reference_taesd(tmp_path_factory):
    """diffusers' full-size AutoencoderTiny with random weights, and its file in diffusers' layout."""
    model = randomize_(AutoencoderTiny(), seed=11)
    path = tmp_path_factory.mktemp("taesd") / "my-taesd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture
def captured(monkeypatch):
    """What pipeline.sample returned and pipeline.encode_images returned, in order."""
    seen: dict[str, list[torch.Tensor]] = {"sample": [], "encode": []}
    for name, key in (("sample", "sample"), ("encode_images", "encode")):
        original = getattr(sdcli.pipeline, name)

        def spy(*args, _original=original, _key=key, **kwargs):
            out = _original(*args, **kwargs)
            seen[_key].append(out.clone())
            return out

        monkeypatch.setattr(sdcli.pipeline, name, spy)
    load_model = sdcli.checkpoint.load_model
    monkeypatch.setattr(sdcli.checkpoint, "load_model", lambda *a, **k: seen.setdefault("model", load_model(*a, **k)))
    return seen


def assert_vae_not_loaded(model) -> None:
    """TAESD does the VAE's work, so the checkpoint's VAE weights were never read."""
    assert all(p.is_meta for p in model.vae.parameters())
    assert not any(p.is_meta for p in model.unet.parameters())


def unit_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def generate(checkpoint, out, *extra, command="txt2img"):
    result = run_cli(
        command, "a lighthouse", "-m", checkpoint, "-W", 64, "-H", 64, "--steps", 3, "--seed", 5,
        "--sampler", "euler", "--dtype", "fp32", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return unit_pixels(out)


def test_cli_decode_equals_autoencoder_tiny(tiny_checkpoint, reference_taesd, captured, tmp_path):
    model, path = reference_taesd
    ours = generate(tiny_checkpoint, tmp_path / "a.png", "--vae", path)
    (latents,) = captured["sample"]
    with torch.no_grad():
        expected = model.decode(latents).sample.clamp(-1, 1)[0].permute(1, 2, 0).numpy() * 0.5 + 0.5
    assert ours.shape == expected.shape == (64, 64, 3)
    assert np.abs(ours - expected).mean() < 1 / 255
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6  # only 8-bit rounding apart
    assert_vae_not_loaded(captured["model"])


def test_img2img_encodes_with_taesd(tiny_checkpoint, reference_taesd, captured, tmp_path):
    model, path = reference_taesd
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    generate(tiny_checkpoint, tmp_path / "b.png", "--vae", path, "--init", tmp_path / "init.png", command="img2img")
    (latents,) = captured["encode"]
    with torch.no_grad():
        expected = model.encode(from_pil(init)).latents  # scaling factor 1: the samplers' latents
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert_vae_not_loaded(captured["model"])


def test_names_find_either_layout_in_the_weights_folder(tiny_checkpoint, reference_taesd, tmp_path):
    model, path = reference_taesd
    combined, split = tmp_path / "combined", tmp_path / "split"
    combined.mkdir(), split.mkdir()
    (combined / "taesd.safetensors").write_bytes(path.read_bytes())
    encoder, decoder = original_layout(model.state_dict())
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(split / "taesd_decoder.safetensors"))
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(split / "taesd_encoder.safetensors"))
    a = generate(tiny_checkpoint, tmp_path / "a.png", "--vae", "taesd", "--weights-dir", combined)
    b = generate(tiny_checkpoint, tmp_path / "b.png", "--vae", "TAESD", "--weights-dir", split)
    c = generate(tiny_checkpoint, tmp_path / "c.png", "--vae", path)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    d = generate(tiny_checkpoint, tmp_path / "d.png")  # the model's own VAE
    assert not np.array_equal(a, d)


def test_missing_taesd_and_a_file_that_is_no_vae_are_one_line_errors(tiny_checkpoint, tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "--vae", "taesdxl", "--weights-dir", empty,
                     "-o", tmp_path / "x.png")  # fmt: skip
    assert result.exit_code == 2 and "sdcli download taesdxl" in result.stderr
    neither = tmp_path / "neither.safetensors"  # neither TAESD nor a VAE
    save_file({"weight": torch.zeros(2)}, str(neither))
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "--vae", neither, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "not a VAE" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_is_taesd(reference_taesd, tiny_checkpoint, tmp_path):
    model, path = reference_taesd
    _, decoder = original_layout(model.state_dict())
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(tmp_path / "dec.safetensors"))
    assert is_taesd("taesd") and is_taesd("TAESDXL") and is_taesd(path) and is_taesd(tmp_path / "dec.safetensors")
    assert not is_taesd(tiny_checkpoint) and not is_taesd(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name", ["taesd", "taesdxl"])
def test_download_aliases_fetch_diffusers_file_under_a_distinct_name(name):
    spec = resolve_spec(name)
    assert (spec.repo_id, spec.path_in_repo) == (f"madebyollin/{name}", "diffusion_pytorch_model.safetensors")
    assert spec.filename == f"{name}.safetensors"  # what --vae NAME looks for in the weights folder


def test_the_memory_check_does_not_count_the_vae_taesd_replaces(
    tiny_checkpoint, reference_taesd, tmp_path, monkeypatch
):
    import sdcli.memory_check
    from sdcli.families import VAE_PREFIX

    counted = []
    monkeypatch.setattr(sdcli.memory_check, "check_fits", lambda r, f, infos, **k: counted.append(set(infos)))
    monkeypatch.setattr(sdcli.tiling, "available_memory", lambda device: 10**12)
    generate(tiny_checkpoint, tmp_path / "a.png", "--vae", reference_taesd[1])
    generate(tiny_checkpoint, tmp_path / "b.png")
    taesd_keys, plain_keys = counted
    assert not any(k.startswith(VAE_PREFIX) for k in taesd_keys)
    assert any(k.startswith(VAE_PREFIX) for k in plain_keys) and taesd_keys < plain_keys
