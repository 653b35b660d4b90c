"""sdcli.download against a local fake hub and file server (tests/fake_hub.py): no internet."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from fake_hub import FakeHub, make_safetensors

from sdcli import download as dl
from sdcli import weights as weights_module
from sdcli.errors import UsageError, WeightsDirError

REPO = "sdcli-test/tiny"
FILE = "tiny.safetensors"
DATA = make_safetensors(75_000)  # ~300 kB
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 8192  # http_get's read size in these tests (DOWNLOAD_CHUNK_SIZE, 10 MB in real use)
CUT = 12 * CHUNK  # where an interrupted transfer stops; a whole number of chunks, so none is half-read


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: the hash cache under tmp_path, no token from the environment, downloads allowed."""
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SDCLI_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # huggingface_hub read these at import (the suite's conftest sets HF_HUB_OFFLINE=1 before it).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Never send a token stored on this machine (hf auth login) to the fake servers.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub().start()
    server.add_file(REPO, FILE, DATA)
    monkeypatch.setenv("HF_ENDPOINT", server.hub_url)
    # http_get waits 1 s before each retry of a broken transfer; tests need no waiting.
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    # http_get writes whole chunks, so a cut loses the chunk being read (up to 10 MB in real use); with
    # small chunks the ~300 kB test file makes progress before each cut, as a 4 GB one does for real.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield server
    server.stop()


@pytest.fixture
def weights(tmp_path) -> Path:
    return tmp_path / "weights"


def leftovers(directory: Path) -> list[str]:
    """Files in the weights directory other than finished models (lock files included: none may remain)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".safetensors"))


# -- the registry -----------------------------------------------------------------------------------


def test_registry_names_safetensors_files_of_known_families():
    from sdcli.families import FAMILIES  # test-only: sdcli.download itself never imports torch

    assert dl.DEFAULT_MODEL == "sd15"
    assert {"sd15", "sd15-inpaint"} <= set(dl.REGISTRY)
    for name, entry in dl.REGISTRY.items():
        assert entry.name == name
        assert entry.filename.endswith(".safetensors")
        assert entry.family in FAMILIES or entry.family in ("sd2", "sdxl")  # SD-Turbo, SDXL-Turbo, taesdxl
        assert entry.sha256 is None or len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert dl.resolve_spec(name).repo_id == entry.repo_id
    assert dl.REGISTRY["sd15-inpaint"].family == "sd1-inpaint"


# -- hub downloads ----------------------------------------------------------------------------------


def test_hub_file_is_downloaded_verified_and_renamed(hub, weights):
    path = dl.download(f"{REPO}/{FILE}", weights, progress=False)

    assert path == (weights / FILE).resolve()
    assert path.read_bytes() == DATA
    assert leftovers(weights) == []
    assert [r.method for r in hub.seen("hub")] == ["HEAD"]  # metadata from the hub, bytes from the CDN
    assert len(hub.seen("cdn", "GET")) == 1
    assert weights_module.sha256_file(path) == SHA


def test_existing_verified_file_is_returned_without_network(hub, weights):
    dl.download(f"{REPO}/{FILE}", weights, progress=False)
    hub.requests.clear()

    assert dl.download(f"{REPO}/{FILE}", weights, progress=False).read_bytes() == DATA
    assert hub.requests == []


def test_alias_downloads_and_checks_the_registry_sha256(hub, weights, monkeypatch):
    entry = dl.RegistryEntry("tiny", REPO, FILE, "sd1", SHA, "test model")
    monkeypatch.setitem(dl.REGISTRY, "tiny", entry)

    assert dl.download("tiny", weights, progress=False).read_bytes() == DATA


def test_a_registry_lora_lands_in_the_default_lora_folder(hub, weights, monkeypatch):
    entry = dl.RegistryEntry("tiny-lora", REPO, "tiny-lcm.safetensors", "sd1", SHA, "test", path_in_repo=FILE,
                             kind="lora")  # fmt: skip
    monkeypatch.setitem(dl.REGISTRY, "tiny-lora", entry)

    assert dl.download("tiny-lora", weights, progress=False) == (weights / "loras" / "tiny-lcm.safetensors").resolve()


def test_alias_whose_registry_sha256_differs_from_the_hub_is_refused_before_downloading(hub, weights, monkeypatch):
    monkeypatch.setitem(dl.REGISTRY, "tiny", dl.RegistryEntry("tiny", REPO, FILE, "sd1", "0" * 64, "test model"))

    with pytest.raises(dl.DownloadError, match="changed upstream"):
        dl.download("tiny", weights, progress=False)
    assert hub.seen("cdn") == []
    assert not (weights / FILE).exists()


def test_interrupted_download_is_resumed_by_the_next_call_with_a_range_request(hub, weights):
    hub.cut_at, hub.cuts = CUT, 100  # every attempt of the first call dies at byte CUT

    with pytest.raises(dl.DownloadError, match="interrupted.*run the same command again to resume"):
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    assert not (weights / FILE).exists()
    assert (weights / f"{FILE}.part").stat().st_size == CUT
    assert leftovers(weights) == [f"{FILE}.part"]  # the resumable part only: no lock file

    hub.cuts = 0
    hub.requests.clear()
    path = dl.download(f"{REPO}/{FILE}", weights, progress=False)

    assert path.read_bytes() == DATA
    assert [r.headers.get("range") for r in hub.seen("cdn", "GET")] == [f"bytes={CUT}-"]
    assert leftovers(weights) == []


def test_connection_cut_once_is_resumed_within_the_same_call(hub, weights):
    hub.cut_at, hub.cuts = CUT, 1

    path = dl.download(f"{REPO}/{FILE}", weights, progress=False)

    assert path.read_bytes() == DATA
    assert [r.headers.get("range") for r in hub.seen("cdn", "GET")] == [None, f"bytes={CUT}-"]


def test_checksum_mismatch_deletes_the_download_and_says_so(hub, weights):
    hub.corrupt.add(SHA)

    with pytest.raises(dl.DownloadError, match=r"sha256 .* expected .*was deleted"):
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    assert not (weights / FILE).exists()
    assert leftovers(weights) == []


def test_gated_repo_without_token_says_accept_the_licence_and_set_hf_token(hub, weights):
    hub.gated[REPO] = "secret"

    with pytest.raises(dl.DownloadError) as err:
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "HTTP 401" in message and "accept the licence" in message and "HF_TOKEN" in message
    assert "--token" in message
    assert not weights.exists() or leftovers(weights) == []


def test_token_reaches_the_hub_but_not_the_cdn(hub, weights, monkeypatch):
    hub.gated[REPO] = "secret"
    monkeypatch.setenv("HF_TOKEN", "secret")

    assert dl.download(f"{REPO}/{FILE}", weights, progress=False).read_bytes() == DATA
    assert hub.seen("hub")[0].headers.get("authorization") == "Bearer secret"
    assert all("authorization" not in r.headers for r in hub.seen("cdn"))


def test_wrong_token_gets_403_and_the_same_advice(hub, weights):
    hub.gated[REPO] = "secret"

    with pytest.raises(dl.DownloadError, match=r"HTTP 403.*accept the licence.*HF_TOKEN or pass --token"):
        dl.download(f"{REPO}/{FILE}", weights, token="wrong", progress=False)


def test_missing_file_404_says_check_the_name_and_list(hub, weights):
    with pytest.raises(dl.DownloadError) as err:
        dl.download(f"{REPO}/nothing.safetensors", weights, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "HTTP 404" in message and "check the name" in message and "sdcli download --list" in message


def test_unknown_repo_401_suggests_both_the_name_and_a_token(hub, weights):
    with pytest.raises(dl.DownloadError, match=r"not found, or is gated or private \(HTTP 401\).*--list.*HF_TOKEN"):
        dl.download("nobody/nothing/x.safetensors", weights, progress=False)


def test_unreachable_hub_says_how_to_download_later_or_use_a_file_at_hand(weights, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    with pytest.raises(dl.DownloadError) as err:
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port}: check the connection")
    assert f"run `sdcli download {REPO}/{FILE}` once online" in message
    assert "--model FILE" in message and f"put it into {weights.resolve()} and pass --model NAME" in message
    assert leftovers(weights) == []  # no lock file left behind


def test_hub_url_is_downloaded_as_the_hub_file_it_names(hub, weights):
    path = dl.download(f"{hub.hub_url}/{REPO}/resolve/main/{FILE}?download=true", weights, progress=False)

    assert path.read_bytes() == DATA
    assert [r.method for r in hub.seen("hub")] == ["HEAD"]


# -- plain URLs -------------------------------------------------------------------------------------


def test_url_download_resumes_a_partial_file_with_range(hub, weights):
    url = hub.add_plain("model.safetensors", DATA)
    hub.cut_at, hub.cuts = CUT, 100

    with pytest.raises(dl.DownloadError, match="resume"):
        dl.download(url, weights, progress=False)
    assert (weights / "model.safetensors.part").stat().st_size == CUT

    hub.cuts = 0
    hub.requests.clear()
    path = dl.download(f"{url}#sha256={SHA}", weights, progress=False)

    assert path.read_bytes() == DATA
    assert [r.headers.get("range") for r in hub.seen("cdn", "GET")] == [f"bytes={CUT}-"]
    assert hub.seen("hub") == []
    assert leftovers(weights) == []


def test_url_with_a_complete_part_file_is_finished_after_a_416(hub, weights):
    url = hub.add_plain("model.safetensors", DATA)
    weights.mkdir()
    (weights / "model.safetensors.part").write_bytes(DATA)  # killed between the last byte and the rename

    assert dl.download(url, weights, progress=False).read_bytes() == DATA


def test_url_with_a_part_file_longer_than_the_remote_file_deletes_it(hub, weights):
    url = hub.add_plain("model.safetensors", DATA)
    weights.mkdir()
    (weights / "model.safetensors.part").write_bytes(DATA + b"extra")

    with pytest.raises(dl.DownloadError, match="was deleted"):
        dl.download(url, weights, progress=False)
    assert leftovers(weights) == []
    assert dl.download(url, weights, progress=False).read_bytes() == DATA


def test_url_sha256_mismatch_deletes_the_file(hub, weights):
    url = hub.add_plain("model.safetensors", DATA)

    with pytest.raises(dl.DownloadError, match="was deleted"):
        dl.download(f"{url}#sha256={'0' * 64}", weights, progress=False)
    assert leftovers(weights) == [] and not (weights / "model.safetensors").exists()


def test_url_404_says_check_the_url_and_leaves_nothing(hub, weights):
    with pytest.raises(dl.DownloadError, match=r"HTTP 404.*check the URL"):
        dl.download(f"{hub.cdn_url}/files/absent.safetensors", weights, progress=False)
    assert leftovers(weights) == []  # no empty .part, no lock


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<!DOCTYPE html><html><body>Please log in</body></html>" * 20, "not a safetensors file"),
        (pickle.dumps({"state_dict": {"w": [0.5] * 1000}}, protocol=4), "pickle"),
        (DATA[: len(DATA) // 2], "truncated"),
    ],
    ids=["html page", "pickle", "half a file"],
)
def test_a_body_that_is_not_safetensors_never_gets_the_model_name(hub, weights, body, reason):
    url = hub.add_plain("model.safetensors", body)  # no sha256 known: only the content can tell

    with pytest.raises(dl.DownloadError, match=rf"is not a safetensors file \(.*{reason}.*\) and was deleted"):
        dl.download(url, weights, progress=False)
    assert not (weights / "model.safetensors").exists()
    assert leftovers(weights) == []


def test_a_broken_file_already_under_the_name_is_downloaded_again(hub, weights, capsys):
    url = hub.add_plain("model.safetensors", DATA)
    weights.mkdir()
    (weights / "model.safetensors").write_text("<html>an error page kept by an older version</html>")

    assert dl.download(url, weights, progress=False).read_bytes() == DATA
    assert "is not a valid safetensors file; downloading it again" in capsys.readouterr().err


def test_credentials_in_a_url_are_sent_but_never_shown(hub, weights, caplog, capsys):
    url = hub.add_plain("model.safetensors", DATA)
    with_password = url.replace("http://", "http://alice:s3cret@")

    assert dl.download(with_password, weights, progress=False).read_bytes() == DATA
    (get,) = hub.seen("cdn", "GET")
    assert get.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()

    absent = with_password.replace("model.safetensors", "absent.safetensors")
    with pytest.raises(dl.DownloadError) as err:
        dl.download(absent, weights, progress=False)
    assert "HTTP 404" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(UsageError) as err:
        dl.download(with_password + "#md5=00", weights, progress=False)
    assert "s3cret" not in str(err.value)
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err + caplog.text


def test_url_never_receives_the_hub_token(hub, weights, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    url = hub.add_plain("model.safetensors", DATA)

    dl.download(url, weights, token="secret", progress=False)
    assert all("authorization" not in r.headers for r in hub.requests)


# -- names we refuse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "https://example.com/../../evil.safetensors",
        "https://example.com/a/%2e%2e/%2e%2e/evil.safetensors",
        "https://example.com/a%2F..%2F..%2Fevil.safetensors",
        "org/repo/../../x.safetensors",
        "org/repo/sub/../../../x.safetensors",
        "org/repo/sub\\..\\x.safetensors",
        "org/repo/.hidden.safetensors",
        "org/repo//x.safetensors",
        "https://example.com/C:evil.safetensors",
    ],
)
def test_names_that_could_leave_the_weights_dir_are_refused(spec, hub, weights):
    with pytest.raises(UsageError):
        dl.download(spec, weights, progress=False)
    assert hub.requests == []
    assert not weights.exists()


@pytest.mark.parametrize(
    "spec", ["org/repo/model.ckpt", "https://example.com/model.ckpt", "https://example.com/x.bin", "org/repo/x.pt"]
)
def test_pickle_files_are_refused(spec):
    with pytest.raises(UsageError, match=r"only \.safetensors .*pickle"):
        dl.resolve_spec(spec)


@pytest.mark.parametrize("spec", ["file:///tmp/model.safetensors", "ftp://example.com/model.safetensors"])
def test_other_schemes_are_refused_as_such_not_as_path_traversal(spec, weights):
    with pytest.raises(UsageError, match=r"only https:// \(and http://\) URLs can be downloaded.*--model") as err:
        dl.download(spec, weights, progress=False)
    assert "traversal" not in str(err.value)


def test_unknown_alias_points_at_the_list():
    with pytest.raises(UsageError, match="sdcli download --list"):
        dl.resolve_spec("sd99")


# -- offline ----------------------------------------------------------------------------------------


def test_offline_with_the_file_absent_says_run_sdcli_download(hub, weights, monkeypatch):
    with pytest.raises(dl.DownloadError, match=rf"run `sdcli download {REPO}/{FILE}` while online") as err:
        dl.download(f"{REPO}/{FILE}", weights, offline=True)
    assert (
        f"pass --model with a .safetensors file you have (a path, or the name of one put into {weights.resolve()})"
        in str(err.value)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE"):
        dl.download(f"{REPO}/{FILE}", weights)
    assert hub.requests == []


def test_offline_with_the_file_present_returns_it(hub, weights, monkeypatch):
    dl.download(f"{REPO}/{FILE}", weights, progress=False)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert dl.download(f"{REPO}/{FILE}", weights).read_bytes() == DATA
    assert hub.requests == []


def test_default_model_is_fetched_with_a_message_on_stderr_only(hub, weights, monkeypatch, capsys):
    monkeypatch.setitem(dl.REGISTRY, "sd15", dl.RegistryEntry("sd15", REPO, FILE, "sd1", SHA, "test model"))

    path = dl.ensure_default_model(weights, progress=False)

    assert path.read_bytes() == DATA
    out, err = capsys.readouterr()
    assert out == ""
    assert "default model sd15" in err
    assert err.count(f"downloading {FILE}") == 1 and err.endswith("done\n")
    assert dl.ensure_default_model(weights, offline=True) == path  # present: fine offline


def test_default_model_offline_and_absent_says_run_sdcli_download_sd15(weights, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(dl.DownloadError, match=r"run `sdcli download sd15`"):
        dl.ensure_default_model(weights)
    assert capsys.readouterr().out == ""


# -- the weights folder and its lock files --------------------------------------------------------


def test_a_weights_folder_we_cannot_write_is_one_line_naming_it(hub, weights, monkeypatch):
    import huggingface_hub.utils

    def refuse(path, **kwargs):  # what filelock raises in a read-only folder (tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(huggingface_hub.utils, "WeakFileLock", refuse)
    with pytest.raises(WeightsDirError) as err:
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    assert str(err.value) == (
        f"cannot write to the weights folder {weights.resolve()}: Permission denied; choose another with "
        "--weights-dir or SDCLI_WEIGHTS_DIR"
    )
    assert hub.seen("cdn") == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_weights_folder_is_refused_before_downloading(hub, weights):
    weights.mkdir()
    weights.chmod(0o555)
    try:
        with pytest.raises(WeightsDirError, match="cannot write to the weights folder"):
            dl.download(f"{REPO}/{FILE}", weights, progress=False)
    finally:
        weights.chmod(0o755)


def test_the_lock_is_removed_when_the_download_is_interrupted(hub, weights, monkeypatch):
    import huggingface_hub.file_download

    def ctrl_c(*args, **kwargs):
        assert (weights / f".{FILE}.lock").exists()  # held while downloading
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dl.download(f"{REPO}/{FILE}", weights, progress=False)
    assert leftovers(weights) == []


def test_without_a_home_directory_downloads_ask_for_a_folder(monkeypatch):
    with pytest.raises(WeightsDirError, match="HOME is not set.*set SDCLI_WEIGHTS_DIR or pass --weights-dir"):
        dl.download(f"{REPO}/{FILE}", weights_module.HOMELESS_WEIGHTS_DIR, progress=False)
    with pytest.raises(WeightsDirError, match="HOME is not set"):
        dl.resolve_model(None, weights_module.HOMELESS_WEIGHTS_DIR)
    with pytest.raises(WeightsDirError, match="HOME is not set"):
        dl.resolve_model("my-model", weights_module.HOMELESS_WEIGHTS_DIR)


# -- --model NAME -----------------------------------------------------------------------------------


def test_model_names_that_are_local_paths_get_local_messages(tmp_path, weights):
    with pytest.raises(UsageError, match=rf"--model {tmp_path} is a folder: give a \.safetensors file inside it"):
        dl.resolve_model(str(tmp_path), weights)
    absent = tmp_path / "sub" / "absent.safetensors"
    with pytest.raises(dl.DownloadError, match=rf"{absent}: no such model file"):
        dl.resolve_model(str(absent), weights)
    with pytest.raises(dl.DownloadError, match="no such model file"):
        dl.resolve_model("./sub/absent.safetensors", weights)


# -- hashes -----------------------------------------------------------------------------------------


def test_a_download_seeds_the_hash_cache(hub, weights, monkeypatch):
    path = dl.download(f"{REPO}/{FILE}", weights, progress=False)
    monkeypatch.setattr(weights_module, "_compute_sha256", lambda p: pytest.fail("hashed again"))

    assert weights_module.short_hash(path) == SHA[:10]


# -- imports ----------------------------------------------------------------------------------------


def test_download_module_and_huggingface_hub_import_no_torch():
    code = (
        "import sys, sdcli.download as d; d.resolve_spec('org/repo/x.safetensors'); d._lock; "
        "import huggingface_hub.file_download, rich.progress; from huggingface_hub.utils import build_hf_headers; "
        "build_hf_headers(library_name='sdcli', library_version='0'); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
