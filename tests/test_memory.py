"""Memory and speed options that must not change results: offloading, torch.compile's fallback, lean loading."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cli, write_checkpoint

from sdcli.families import CLIP_PREFIX, ClipConfig, Family, TextEncoderSpec, UNetConfig, VAEConfig

FAST = ["--steps", "3", "-W", "64", "-H", "64", "--seed", "3", "--sampler", "euler_a"]


def test_low_memory_gives_the_same_image(tiny_checkpoint, tmp_path):
    # On this CPU-only machine the networks' trips to the compute device are no-ops; the code path is the same.
    assert run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "-o", tmp_path / "a.png").exit_code == 0
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--low-memory", "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_offloaded_networks_visit_the_device_only_while_used(tiny_checkpoint):
    from sdcli.checkpoint import load_model

    model = load_model(tiny_checkpoint, offload=True)
    moves = []
    model.unet.to = lambda device: moves.append(str(device)) or model.unet  # record, do not move
    with model.use(model.unet) as unet:
        assert unet is model.unet and moves == ["cpu"]  # to the compute device (the CPU here) ...
    assert moves == ["cpu", "cpu"]  # ... and back to the CPU afterwards


def test_compile_failure_falls_back_with_a_warning(tiny_checkpoint, tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "-o", tmp_path / "a.png").exit_code == 0
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--compile", "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert "warning: --compile failed (RuntimeError: no C++ compiler found); running uncompiled" in result.stderr
    assert result.stderr.count("--compile failed") == 1
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# Big enough (~100 MB in fp32) that a second copy of the weights would stand out from Python's own noise.
MEDIUM = Family(
    "sd1",
    unet=UNetConfig(model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=1, transformer_depth=(1, 1, 0),
                    context_dim=256),
    vae=VAEConfig(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1),
    text_encoders=(TextEncoderSpec(CLIP_PREFIX, ClipConfig(hidden_size=256, intermediate_size=1024,
                                                           num_hidden_layers=4, num_attention_heads=4)),),
)  # fmt: skip

MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from sdcli.checkpoint import load_model

    def high_water_mark():  # peak RSS of this process in bytes (ru_maxrss would include the parent's, on Linux)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    before = high_water_mark()
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    peak = high_water_mark()
    nets = (model.unet, model.vae, model.text_encoder)
    size = sum(p.numel() * p.element_size() for m in nets for p in m.parameters())
    print(json.dumps({"before": before, "peak": peak, "weights": size}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(("file_dtype", "model_dtype"), [(torch.float32, "float32"), (torch.float16, "bfloat16")])
def test_loading_holds_no_second_copy_of_the_weights(tmp_path, file_dtype, model_dtype):
    from safetensors.torch import save_file

    path = write_checkpoint(MEDIUM, tmp_path / "medium.safetensors")
    if file_dtype != torch.float32:
        from safetensors.torch import load_file

        save_file({k: v.to(file_dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    out = subprocess.run([sys.executable, "-c", MEASURE, path, model_dtype], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    grown = m["peak"] - m["before"]
    # One copy of the weights in the model's dtype, plus a fixed ~65 MB that the first tensor operations cost
    # (measured: loading the 35 MB tiny checkpoint grows peak RSS by 100 MB). A second copy of the weights, or
    # the file's pages kept beside them, would add 156 to 313 MB more.
    assert m["weights"] > 150e6
    assert grown < 1.1 * m["weights"] + 100e6, (grown, m["weights"])
    print(f"loading grew peak RSS by {grown / 1e6:.0f} MB for {m['weights'] / 1e6:.0f} MB of weights")


def test_vae_tiling_option_runs_through_encode_and_decode(tiny_checkpoint, tmp_path):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(init)
    for flag in ("--vae-tiling", "--no-vae-tiling"):
        out = tmp_path / f"{flag}.png"
        result = run_cli("img2img", "x", "--init", init, "-m", tiny_checkpoint, *FAST, flag, "-o", out)
        assert result.exit_code == 0, result.output
    # One tile covers this small image, so tiled and untiled work are the same.
    assert (tmp_path / "--vae-tiling.png").read_bytes() == (tmp_path / "--no-vae-tiling.png").read_bytes()
