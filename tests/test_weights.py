"""sdcli.weights: where the weights directory is, which models are in it, and the cached sha256 hashes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdcli import weights as w
from sdcli.download import REGISTRY
from sdcli.errors import WeightsDirError

DATA = bytes(range(256)) * 1000  # 256 kB, not a palindrome: reversed, it hashes differently
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: the hash cache under tmp_path, no weights directory from the environment."""
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDCLI_WEIGHTS_DIR", raising=False)


# -- directories and local models -------------------------------------------------------------------


def test_weights_dir_precedence_explicit_env_checkout_user(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "sdcli").mkdir(parents=True)
    (checkout / "weights").mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'sdcli'\n")
    monkeypatch.setattr(w, "_PACKAGE_DIR", checkout / "sdcli")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)  # the answer must not depend on the working directory

    assert w.weights_dir() == checkout / "weights"
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(tmp_path / "env"))
    assert w.weights_dir() == tmp_path / "env"
    assert w.weights_dir("explicit") == tmp_path / "explicit"
    assert w.weights_dir(tmp_path / "explicit") == tmp_path / "explicit"

    monkeypatch.delenv("SDCLI_WEIGHTS_DIR")
    monkeypatch.setattr(w, "_PACKAGE_DIR", tmp_path / "site-packages" / "sdcli")  # an installed copy
    if sys.platform.startswith("linux"):
        assert w.weights_dir() == tmp_path / "xdg" / "sdcli" / "weights"
    assert w.weights_dir().is_absolute()


def test_find_local_model_by_alias_stem_file_name_or_path(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("mine.safetensors", REGISTRY["sd15"].filename, "notes.txt"):
        (weights / name).write_bytes(b"x")

    assert w.find_local_model("sd15", weights) == weights / REGISTRY["sd15"].filename
    assert w.find_local_model("mine", weights) == weights / "mine.safetensors"
    assert w.find_local_model("mine.safetensors", weights) == weights / "mine.safetensors"
    assert w.find_local_model(str(weights / "mine.safetensors"), tmp_path) == weights / "mine.safetensors"
    assert w.find_local_model("sd15-inpaint", weights) is None  # known but not downloaded
    assert w.find_local_model("notes", weights) is None
    assert w.find_local_model("../weights/mine", weights) is None


def test_list_local_models_lists_only_finished_safetensors(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "c.safetensors.part").write_bytes(b"x")
    (tmp_path / ".c.safetensors.lock").write_bytes(b"")
    (tmp_path / "d.ckpt").write_bytes(b"x")

    assert w.list_local_models(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert w.list_local_models(tmp_path / "absent") == []


def _no_home(monkeypatch, tmp_path):
    """As in a container run with an arbitrary user id: HOME unset and no passwd entry; not a checkout."""
    import pwd

    for var in ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "SDCLI_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(w, "_PACKAGE_DIR", tmp_path / "site-packages" / "sdcli")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the passwd fallback is POSIX's")
def test_without_a_home_directory_nothing_crashes_until_a_folder_is_needed(tmp_path, monkeypatch):
    _no_home(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError):
        Path.home()  # the situation: pathlib cannot find a home

    directory = w.weights_dir()
    assert directory == w.HOMELESS_WEIGHTS_DIR and not directory.exists()
    assert w.list_local_models(directory) == [] and w.find_local_model("sd15", directory) is None
    with pytest.raises(WeightsDirError, match=r"HOME is not set and user id \d+ has no home directory; set "):
        w.require_weights_dir(directory)
    path = tmp_path / "m.safetensors"
    path.write_bytes(DATA)
    assert w.sha256_file(path) == SHA  # nowhere to cache it: computed
    assert w.require_weights_dir(tmp_path) == tmp_path
    with pytest.raises(WeightsDirError, match="no home directory to expand '~' to"):
        w.weights_dir("~/models")

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # an absolute XDG folder needs no home
    assert w.weights_dir() == tmp_path / "xdg" / "sdcli" / "weights"
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(tmp_path / "env"))
    assert w.weights_dir() == tmp_path / "env"


# -- hashes -----------------------------------------------------------------------------------------


def test_sha256_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(DATA)
    reads = []
    real = w._compute_sha256
    monkeypatch.setattr(w, "_compute_sha256", lambda p: reads.append(p) or real(p))

    assert w.sha256_file(path) == SHA
    assert w.sha256_file(path) == SHA
    assert w.short_hash(path) == SHA[:10]
    assert len(reads) == 1
    assert (tmp_path / "cache" / "sha256.json").is_file()

    path.write_bytes(DATA[::-1])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert w.sha256_file(path) == hashlib.sha256(DATA[::-1]).hexdigest()
    assert len(reads) == 2
    assert w.sha256_file(path, cache=False) and len(reads) == 3


# -- imports ----------------------------------------------------------------------------------------


def test_model_specs_and_weights_import_in_one_direction():
    import ast

    def imported(module: str) -> set[str]:
        tree = ast.parse((Path(w.__file__).parent / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "sdcli.model_specs" in imported("weights")
    assert "sdcli.weights" not in imported("model_specs")


def test_weights_module_imports_neither_torch_nor_huggingface_hub(tmp_path):
    code = (
        "import sys, sdcli.weights as w; "
        f"w.weights_dir(); w.list_local_models({str(tmp_path)!r}); w.find_local_model('sd15', {str(tmp_path)!r}); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'huggingface_hub')); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
