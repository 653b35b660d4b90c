"""sdcli.prediction: the order in which a file's prediction type is decided, one step at a time."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcli.errors import UsageError
from sdcli.families import SD1, SD2, SD2_INPAINT, SDXL
from sdcli.header import read_header
from sdcli.prediction import HEURISTIC_KEY, decide_prediction, family_with_prediction, sidecar_parameterization


def write(path: Path, tensors: dict) -> Path:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3), **tensors}, str(path))
    return path


def bias_with_std(std: float, n: int = 320) -> torch.Tensor:
    """A norm bias whose population std (unbiased=False, as ComfyUI measures it) is exactly `std`."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return ((x - x.mean()) / x.std(unbiased=False) * std + 0.3).half()


def decide(path: Path, family=SD2, override=None):
    return decide_prediction(path, read_header(path), family, override)


@pytest.mark.parametrize(("std", "expected"), [(0.12, "v"), (0.06, "eps")])
def test_sd2_heuristic_reads_the_std_of_one_norm_bias(tmp_path, std, expected):
    path = write(tmp_path / "m.safetensors", {HEURISTIC_KEY: bias_with_std(std)})
    assert decide(path) == (expected, "heuristic")
    # Only SD 2.x text-to-image files: the inpainting model and other families keep their own type.
    assert decide(path, SD2_INPAINT).source == "family" and decide(path, SDXL).kind == "eps"


def test_sidecar_yaml_beats_the_heuristic_and_the_marker_key_beats_the_sidecar(tmp_path):
    path = write(tmp_path / "m.safetensors", {HEURISTIC_KEY: bias_with_std(0.01)})
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: 'v'  # v-prediction\n")
    assert decide(path) == ("v", "m.yaml")
    marked = write(tmp_path / "marked.safetensors", {"v_pred": torch.tensor([])})
    (tmp_path / "marked.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert decide(marked, SD1) == ("v", "v_pred key")


def test_the_option_beats_everything_and_is_checked(tmp_path):
    path = write(tmp_path / "m.safetensors", {"v_pred": torch.tensor([]), HEURISTIC_KEY: bias_with_std(0.2)})
    assert decide(path, override="eps") == ("eps", "--prediction")
    with pytest.raises(UsageError, match="--prediction must be one of eps, v"):
        decide(path, override="x0")


def test_nothing_said_means_the_family_default(tmp_path):
    path = write(tmp_path / "m.safetensors", {})
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert sidecar_parameterization(path) is None
    assert decide(path) == ("eps", "family")


def test_v_turns_sd2_into_sd2_v_with_its_768_default(tmp_path):
    path = write(tmp_path / "m.safetensors", {})
    family, prediction = family_with_prediction(path, read_header(path), SD2, "v")
    assert (family.name, family.prediction, family.default_size) == ("sd2-v", "v", 768)
    back, _ = family_with_prediction(path, read_header(path), family, "eps")
    assert (back.name, back.default_size) == ("sd2", 512)
    xl, _ = family_with_prediction(path, read_header(path), SDXL, "v")
    assert (xl.name, xl.prediction, xl.default_size) == ("sdxl", "v", 1024)
