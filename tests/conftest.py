"""Tiny model configurations, random-weight checkpoints and the reference conversion, shared by tests."""

from __future__ import annotations

import os
from dataclasses import replace

# No test depends on the user's settings: sdcli's own, the Hugging Face hub's (token, endpoint, caches, offline
# mode; huggingface_hub reads them once, at import) or oneDNN's fp32 maths mode (which can run fp32 matmuls in bf16).
for _name in [k for k in os.environ if k.startswith(("SDCLI_", "HF_")) or k == "ONEDNN_DEFAULT_FPMATH_MODE"]:
    del os.environ[_name]
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # nor send a token saved by `hf auth login`
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdcli import devices  # noqa: E402
from sdcli.families import CLIP_PREFIX, SD1, UNET_PREFIX, VAE_PREFIX, ClipConfig, Family, UNetConfig, VAEConfig  # noqa: E402
from sdcli.models.unet import UNetModel  # noqa: E402
from sdcli.models.vae import AutoencoderKL  # noqa: E402

# Two sizes of each network that differ in width, heads, depth and attention levels.
TINY_UNETS = {
    "a": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(1, 0),
        num_heads=2,
        context_dim=32,
    ),
    "b": UNetConfig(
        in_channels=9,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        transformer_depth=(1, 2, 0),
        transformer_depth_middle=2,
        num_heads=4,
        context_dim=48,
    ),
    "linear": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(1, 1),
        num_head_channels=16,
        context_dim=32,
        use_linear_in_transformer=True,
    ),
}
TINY_VAES = {
    "a": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "b": VAEConfig(ch=64, ch_mult=(1, 1, 2), num_res_blocks=2),
}
TINY_CLIPS = {
    "a": ClipConfig(
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
    ),
    "b": ClipConfig(
        vocab_size=500,
        max_position_embeddings=16,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=3,
        hidden_act="gelu",
    ),
}
# A whole SD 1.x-shaped model small enough for end-to-end tests. The real vocabulary size lets real
# token ids through; the CLIP width is 128 so detection's 64-wide-head rule gives 2 heads; the UNet keeps
# SD 1.x's 8 heads.
TINY_SD1 = Family(
    "sd1",
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), num_heads=8, context_dim=128
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_encoders=(
        replace(
            SD1.text_encoders[0],
            config=ClipConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        ),
    ),
)
TINY_SD1_INPAINT = replace(TINY_SD1, name="sd1-inpaint", unet=replace(TINY_SD1.unet, in_channels=9))


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16",
        choices=("no", "yes"),
        default="no",
        help="what sdcli's native-bf16 CPU probe answers in tests that fake no machine of their own (default: no); "
        "the suite must pass with either",
    )


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin is configured
def pytest_configure(config):
    """The hub's cache and token folder under pytest's temporary folder, set before any test module imports
    huggingface_hub (which reads HF_HOME once)."""
    os.environ["HF_HOME"] = str(config._tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def fake_machine(monkeypatch):
    """`fake_machine(cuda=, mps=, native_bf16=)` makes sdcli see that hardware for the rest of the test."""

    def fake(*, cuda: bool = False, mps: bool = False, native_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)

    return fake


@pytest.fixture(autouse=True)
def _same_machine_everywhere(fake_machine, pytestconfig):
    """Every test sees the same machine whatever runs it: no GPU, and a CPU without native bf16 (with it under
    --cpu-bf16=yes), so `--device auto` and `--dtype auto` choose alike on every machine. Tests that compare with
    an fp32 reference pin fp32 anyway; the suite passes with either answer."""
    fake_machine(native_bf16=pytestconfig.getoption("--cpu-bf16", "no") == "yes")


def run_cli(*args, input: str | None = None):
    """Run the sdcli command line in-process; every argument is turned into a string."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, norm scales and biases included, so no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))  # keeps activations near unit scale
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def tiny_state_dict(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full checkpoint in the original single-file layout, with random weights."""
    from sdcli.text_encoders import build_text_encoder

    parts = (
        (UNET_PREFIX, randomize_(UNetModel(family.unet), seed)),
        (VAE_PREFIX, randomize_(AutoencoderKL(family.vae), seed + 1)),
        *((s.prefix, randomize_(build_text_encoder(s), seed + 2 + i)) for i, s in enumerate(family.text_encoders)),
    )
    return {prefix + k: v.contiguous() for prefix, m in parts for k, v in m.state_dict().items()}


@pytest.fixture(scope="session", autouse=True)
def _private_sdcli_dirs(tmp_path_factory):
    """Hash cache and weights directory under pytest's temporary folder, never the user's."""
    saved = {k: os.environ.get(k) for k in ("SDCLI_CACHE_DIR", "SDCLI_WEIGHTS_DIR")}
    os.environ["SDCLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["SDCLI_WEIGHTS_DIR"] = str(tmp_path_factory.mktemp("weights"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def write_checkpoint(family: Family, path, seed: int = 0) -> str:
    """A tiny checkpoint file (fp32) with the extras real files carry."""
    from safetensors.torch import save_file

    sd = tiny_state_dict(family, seed)
    sd[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    sd["model_ema.num_updates"] = torch.tensor(0)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny SD 1.x checkpoint."""
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory) -> str:
    """A tiny SD 1.x inpainting checkpoint (9-channel UNet)."""
    return write_checkpoint(TINY_SD1_INPAINT, tmp_path_factory.mktemp("ckpt") / "tiny-sd1-inpaint.safetensors", 10)


SD1 = SD1  # re-exported for tests that compare against the full-size family
