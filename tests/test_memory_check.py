"""The memory estimate made before loading, and the CLI's refusal of a batch that cannot fit."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from sdcli import run_load, tiling
from sdcli.checkpoint import components
from sdcli.errors import SdcliError
from sdcli.families import SD1
from sdcli.header import TensorInfo
from sdcli.memory_check import UNET_MAPS, check_fits, estimate, too_large_message, weights_bytes
from sdcli.request import GenerationRequest

GB = 10**9


@pytest.fixture(scope="module")
def sd1_networks() -> list[tuple[str, torch.nn.Module]]:
    """The full-size SD 1.x networks with their checkpoint prefixes, on the meta device (no memory)."""
    with torch.device("meta"):
        return [(prefix, build()) for prefix, build, _ in components(SD1)]


@pytest.fixture(scope="module")
def sd1_infos(sd1_networks) -> dict[str, TensorInfo]:
    """The header of a full-size SD 1.x fp32 checkpoint, with the extras real files carry."""
    infos = {}
    for prefix, network in sd1_networks:
        for key, tensor in network.state_dict().items():
            infos[prefix + key] = TensorInfo("F32" if tensor.is_floating_point() else "I64", tuple(tensor.shape))
    infos["model_ema.decay"] = TensorInfo("F32", ())
    infos["alphas_cumprod"] = TensorInfo("F64", (1000,))
    return infos


def sd1(size: int, infos, *, dtype_bytes: int, tiled: bool, batch: int = 1, cfg: float = 7.5):
    weights = weights_bytes(infos, SD1, dtype_bytes)
    return estimate(SD1, size, size, batch, cfg=cfg, dtype_bytes=dtype_bytes, weights=weights, vae_tiled=tiled)


def test_weights_are_the_networks_tensors_at_the_target_dtype(sd1_networks, sd1_infos):
    tensors = [t for _, network in sd1_networks for t in network.state_dict().values()]
    params = sum(t.numel() for t in tensors if t.is_floating_point())
    others = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
    assert weights_bytes(sd1_infos, SD1, 2) == 2 * params + others
    assert 1.0e9 < params < 1.1e9  # SD 1.5: 860M UNet, 123M text encoder, 84M VAE
    assert weights_bytes({"model_ema.decay": TensorInfo("F32", (10,))}, SD1, 4) == 0


@pytest.mark.parametrize("tiled", [False, True])
def test_a_512_sd1_job_fits_in_8_gb_even_in_fp32(sd1_infos, tiled):
    assert sd1(512, sd1_infos, dtype_bytes=4, tiled=tiled).total < 8 * GB


def test_a_4096_untiled_decode_is_refused_on_24_gb_and_tiled_it_fits(sd1_infos):
    untiled = sd1(4096, sd1_infos, dtype_bytes=2, tiled=False)
    tiled = sd1(4096, sd1_infos, dtype_bytes=2, tiled=True)
    assert untiled.total > 24 * GB and untiled.vae > untiled.unet  # the decode dominates
    assert tiled.total < 24 * GB
    assert tiled.unet == untiled.unet and tiled.weights == untiled.weights


def test_the_unet_part_follows_the_rule_and_scales_with_batch_and_cfg(sd1_infos):
    one = sd1(512, sd1_infos, dtype_bytes=2, tiled=True, cfg=1.0)
    assert one.unet == UNET_MAPS * 320 * 64 * 64 * 2  # model_channels x the 64x64 latent, 2 bytes
    assert sd1(512, sd1_infos, dtype_bytes=2, tiled=True, cfg=7.5).unet == 2 * one.unet
    assert sd1(512, sd1_infos, dtype_bytes=2, tiled=True, cfg=1.0, batch=3).unet == 3 * one.unet


def test_the_message_names_what_would_help(sd1_infos):
    need = sd1(4096, sd1_infos, dtype_bytes=2, tiled=False, batch=2)
    line = too_large_message(need, 24 * GB, 4096, 4096, 2, device="GPU", can_tile=True, can_offload=True)
    assert "4096x4096 in batches of 2 needs about" in line and "24.0 GB is free on the GPU" in line
    assert "--vae-tiling" in line and "--low-memory" in line and "--batch-size" in line and "\n" not in line
    line = too_large_message(need, 24 * GB, 4096, 4096, 1, device="CPU", can_tile=False, can_offload=False)
    assert "--vae-tiling" not in line and "--low-memory" not in line and line.endswith("try a smaller size")


def test_check_fits_counts_no_weights_with_low_memory_on_a_gpu(sd1_infos):
    requests = [GenerationRequest("x", width=512, height=512)]
    gpu = torch.device("cuda")  # only its name is used: nothing is allocated
    free = 1 * GB  # room for the activations, not the 2.1 GB of fp16 weights
    args = dict(batch_size=1, device=gpu, dtype=torch.float16, free=free, vae_tiling=None)
    check_fits(requests, SD1, sd1_infos, low_memory=True, **args)
    with pytest.raises(SdcliError, match="--low-memory"):
        check_fits(requests, SD1, sd1_infos, low_memory=False, **args)
    check_fits(requests, SD1, sd1_infos, low_memory=False, **{**args, "free": None})  # unknown: not checked


def test_the_cli_refuses_before_loading_when_memory_is_short(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "available_memory", lambda device: 10**6)

    def refuse(*_args):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(run_load, "load_run_model", refuse)
    args = ("txt2img", "x", "-m", tiny_checkpoint, "--dtype", "fp32", "--steps", 1, "-W", 64, "-H", 64)
    result = run_cli(*args, "--no-vae-tiling", "--outdir", tmp_path / "o")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 64x64 needs about"), result.output
    assert "but only 1 MB is free on the CPU" in lines[0] and "--vae-tiling" in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_cli_runs_when_memory_is_plenty(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "available_memory", lambda device: 10**12)
    out = tmp_path / "o.png"
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, "--dtype", "fp32", "--steps", 1, "-W", 64, "-H", 64,
                     "-o", out, "--seed", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file()
