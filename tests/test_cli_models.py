"""The model-management side of the CLI: the default model arriving by itself, `download`, `models`, --model NAME.

A local fake hub (tests/fake_hub.py) serves a tiny checkpoint in place of the real SD 1.5 file.
"""

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_download import REPO, _isolated, hub  # noqa: F401 - fixtures

from sdcli import download as dl

FILE = "tiny-sd15.safetensors"


@pytest.fixture
def tiny_default(hub, tiny_checkpoint, monkeypatch):  # noqa: F811 - the fixture imported above
    """The registry's default model replaced by the tiny checkpoint, served by the fake hub."""
    data = Path(tiny_checkpoint).read_bytes()
    hub.add_file(REPO, FILE, data)
    import hashlib

    entry = dl.RegistryEntry("sd15", REPO, FILE, "sd1", hashlib.sha256(data).hexdigest(), "tiny stand-in")
    monkeypatch.setitem(dl.REGISTRY, "sd15", entry)
    return entry


def test_txt2img_without_model_downloads_the_default_first(tiny_default, tmp_path):
    weights = tmp_path / "weights"
    out = tmp_path / "out.png"
    result = run_cli("txt2img", "a cat", "--steps", 2, "-W", 64, "-H", 64, "--weights-dir", weights, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and out.is_file()
    assert "default model sd15 is not downloaded yet" in result.stderr
    assert (weights / FILE).is_file()
    again = run_cli("txt2img", "a cat", "--steps", 2, "-W", 64, "-H", 64, "--weights-dir", weights, "-o", out)
    assert again.exit_code == 0 and "not downloaded yet" not in again.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_txt2img_offline_without_the_default_says_run_sdcli_download(tiny_default, tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["txt2img", "a cat", "--weights-dir", tmp_path / "weights", "-o", tmp_path / "out.png"]
    result = run_cli(*args, *(["--offline"] if how == "flag" else []))
    assert result.exit_code == 1
    assert "sdcli download sd15" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_download_prints_the_path_and_models_lists_it(tiny_default, tmp_path):
    weights = tmp_path / "weights"
    result = run_cli("download", "sd15", "--weights-dir", weights)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str((weights / FILE).resolve())

    listing = run_cli("models", "--weights-dir", weights)
    assert listing.exit_code == 0, listing.output
    assert f"weights folder: {weights}" in listing.stderr
    assert "tiny-sd15" in listing.stdout and "sd1" in listing.stdout and "F32" in listing.stdout

    as_json = run_cli("models", "--weights-dir", weights, "--json")
    (entry,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert entry["name"] == "tiny-sd15" and entry["family"] == "sd1" and entry["dtype"] == "F32"
    assert entry["hash"] == tiny_default.sha256[:10] and entry["size"] == (weights / FILE).stat().st_size

    by_name = run_cli("txt2img", "x", "-m", "tiny-sd15", "--weights-dir", weights, "--steps", 1, "-W", 64, "-H", 64,
                      "-o", tmp_path / "named.png")  # fmt: skip
    assert by_name.exit_code == 0, by_name.output


def test_download_list_shows_the_registry():
    result = run_cli("download", "--list")
    assert result.exit_code == 0
    assert "sd15 (default)" in result.stdout and "sd15-inpaint" in result.stdout
    assert "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/" in result.stdout


def test_models_reports_a_broken_file_without_failing(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "broken.safetensors").write_text("nope")
    result = run_cli("models", "--weights-dir", weights, "--json")
    assert result.exit_code == 0, result.output
    (entry,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert entry["family"] == "unknown" and "not a safetensors file" in entry["error"]


def test_unknown_model_name_is_a_one_line_error(tmp_path):
    result = run_cli("txt2img", "x", "-m", "no-such-model", "--weights-dir", tmp_path, "-o", tmp_path / "o.png")
    assert result.exit_code == 1
    assert "no-such-model: no such model file" in result.stderr and "sdcli models" in result.stderr
