"""Embedding files that hold no vectors are refused in one line, as other unusable files are."""

import pytest
import torch
from safetensors.torch import save_file

from sdcli.embeddings import load_embedding
from sdcli.errors import CheckpointError
from sdcli.families import SD1


@pytest.mark.parametrize("tensor", [torch.tensor(1.0), torch.zeros(0, 768), torch.zeros(2, 0)], ids=str)
def test_an_embedding_without_vectors_is_refused(tmp_path, tensor):
    path = tmp_path / "empty.safetensors"
    save_file({"emb_params": tensor}, path)
    with pytest.raises(CheckpointError, match=r"empty.safetensors: holds no vectors"):
        load_embedding(path, SD1)
