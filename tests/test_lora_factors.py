"""LoRA files whose factors are empty or vectors are refused in one line, naming the module."""

import pytest
import torch
from safetensors.torch import save_file

from sdcli.errors import LoraError
from sdcli.lora import load_lora

MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.mark.parametrize(
    "tensors",
    [
        {"lokr_w1": torch.zeros(3), "lokr_w2": torch.zeros(3)},  # vectors: no (out, in) to read
        {"lora_down.weight": torch.zeros(0, 8), "lora_up.weight": torch.zeros(8, 0), "alpha": torch.tensor(4.0)},
    ],
    ids=["lokr-vectors", "rank-0-with-alpha"],
)
def test_factors_without_a_matrix_are_refused(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_file({f"{MODULE}.{name}": tensor for name, tensor in tensors.items()}, path)
    with pytest.raises(LoraError, match=rf"bad.safetensors: module '{MODULE}' has empty or one-dimensional factors"):
        load_lora(path).modules[MODULE].delta_shape()
