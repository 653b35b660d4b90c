"""The model-management side of the CLI: the default model arriving by itself, `download`, `models`, --model NAME.

A local fake hub (tests/fake_hub.py) serves a tiny checkpoint in place of the real SD 1.5 file.
"""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_download import REPO, _isolated, hub  # noqa: F401 - fixtures

from sdcli import download as dl
from sdcli import weights as weights_module

FILE = "tiny-sd15.safetensors"


@pytest.fixture
def tiny_default(hub, tiny_checkpoint, monkeypatch):  # noqa: F811 - the fixture imported above
    """The registry's default model replaced by the tiny checkpoint, served by the fake hub."""
    data = Path(tiny_checkpoint).read_bytes()
    hub.add_file(REPO, FILE, data)
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


def test_models_lists_unreadable_files_with_their_reason_and_goes_on(tiny_checkpoint, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "broken.safetensors").write_text("nope")
    (weights / "good.safetensors").write_bytes(Path(tiny_checkpoint).read_bytes())
    locked = weights / "locked.safetensors"
    locked.write_bytes(Path(tiny_checkpoint).read_bytes())
    real_open = Path.open

    def no_permission(self, *args, **kwargs):  # chmod 000 as seen by a normal user (tests may run as root)
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    def sha256(path):
        with no_permission(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    monkeypatch.setattr(Path, "open", no_permission)
    monkeypatch.setattr(weights_module, "_compute_sha256", sha256)

    result = run_cli("models", "--weights-dir", weights, "--json")
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in map(json.loads, result.stdout.splitlines())}
    assert list(entries) == ["broken", "good", "locked"]
    assert entries["broken"]["family"] == "unreadable" and "not a safetensors file" in entries["broken"]["error"]
    assert entries["locked"]["family"] == "unreadable" and "Permission denied" in entries["locked"]["error"]
    assert entries["locked"]["hash"] is None
    assert entries["good"]["family"] == "sd1" and "error" not in entries["good"]

    text = run_cli("models", "--weights-dir", weights)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len(lines) == 3 and "unreadable" in lines[2] and "Permission denied" in lines[2]


def test_download_into_a_folder_we_cannot_write_is_one_line_and_exit_1(tiny_default, tmp_path, monkeypatch):
    import huggingface_hub.utils

    def refuse(path, **kwargs):  # what filelock raises in a read-only folder
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(huggingface_hub.utils, "WeakFileLock", refuse)
    result = run_cli("download", "sd15", "--weights-dir", tmp_path / "weights")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write to the weights folder {(tmp_path / 'weights').resolve()}: Permission denied; "
        "choose another with --weights-dir or SDCLI_WEIGHTS_DIR"
    ]


def test_first_run_without_network_says_what_to_do_and_leaves_no_lock(tiny_default, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    weights = tmp_path / "weights"

    result = run_cli("txt2img", "a cat", "--weights-dir", weights, "-o", tmp_path / "out.png")
    assert result.exit_code == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "run `sdcli download sd15` once online" in error
    assert f"put it into {weights.resolve()} and pass --model NAME" in error and "--model FILE" in error
    assert list(weights.iterdir()) == []  # no lock file, no empty part


def test_without_a_home_directory_a_model_file_still_works(tiny_checkpoint, tmp_path, monkeypatch):
    from test_weights import _no_home

    _no_home(monkeypatch, tmp_path)
    monkeypatch.delenv("SDCLI_WEIGHTS_DIR", raising=False)
    out = tmp_path / "out.png"

    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, "--steps", 1, "-W", 64, "-H", 64, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    models = run_cli("models")
    assert models.exit_code == 1 and "HOME is not set" in models.stderr and "SDCLI_WEIGHTS_DIR" in models.stderr


def test_a_folder_or_another_scheme_as_model_gets_an_accurate_message(tmp_path):
    folder = run_cli("txt2img", "x", "-m", tmp_path, "-o", tmp_path / "o.png")
    assert folder.exit_code == 2
    assert f"--model {tmp_path} is a folder: give a .safetensors file inside it" in folder.stderr
    ftp = run_cli("download", "ftp://example.com/model.safetensors", "--weights-dir", tmp_path)
    assert ftp.exit_code == 2 and "only https://" in ftp.stderr and "traversal" not in ftp.stderr


def test_unknown_model_name_is_a_one_line_error(tmp_path):
    result = run_cli("txt2img", "x", "-m", "no-such-model", "--weights-dir", tmp_path, "-o", tmp_path / "o.png")
    assert result.exit_code == 1
    assert "no-such-model: no such model file" in result.stderr and "sdcli models" in result.stderr
