"""Textual-inversion files: the layouts A1111 and kohya save, the checks, the names a prompt uses, TI hashes."""

import hashlib
from dataclasses import replace

import pytest
import torch
from conftest import TINY_SD1
from safetensors.torch import save_file

from sdcli.embeddings import EmbeddingLibrary, default_embeddings_dir, load_embedding
from sdcli.errors import CheckpointError
from sdcli.families import ClipConfig
from sdcli.weights import weights_dir

WIDTH = TINY_SD1.text_encoders[0].config.hidden_size  # 128
# A two-encoder family shaped like SDXL's pair (CLIP-L first, then the wider CLIP-G).
TWO_ENCODERS = replace(
    TINY_SD1,
    name="two-encoders",
    text_encoders=(
        TINY_SD1.text_encoders[0],
        replace(TINY_SD1.text_encoders[0], config=ClipConfig(hidden_size=64, num_hidden_layers=1)),
    ),
)


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(path, tensors: dict) -> object:
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "key", ["emb_params", "string_to_param.*", "anything_alone"], ids=["a1111", "string_to_param", "single tensor"]
)
def test_one_encoder_layouts_give_their_vectors(tmp_path, key):
    expected = vectors(3)
    embedding = load_embedding(write(tmp_path / "style.safetensors", {key: expected}), TINY_SD1)
    assert embedding.name == "style" and len(embedding.vectors) == 1
    assert torch.equal(embedding.vectors[0], expected)


def test_a_single_vector_saved_flat_is_one_row(tmp_path):
    embedding = load_embedding(write(tmp_path / "one.safetensors", {"emb_params": vectors(1)[0]}), TINY_SD1)
    assert embedding.vectors[0].shape == (1, WIDTH)


def test_sdxl_layout_gives_one_tensor_per_encoder_in_order(tmp_path):
    clip_l, clip_g = vectors(2), vectors(2, 64, seed=1)
    path = write(tmp_path / "xl.safetensors", {"clip_g": clip_g, "clip_l": clip_l})
    embedding = load_embedding(path, TWO_ENCODERS)
    assert torch.equal(embedding.vectors[0], clip_l) and torch.equal(embedding.vectors[1], clip_g)


def test_a_layout_for_another_number_of_encoders_is_a_clear_error(tmp_path):
    xl = write(tmp_path / "xl.safetensors", {"clip_l": vectors(1), "clip_g": vectors(1, 64)})
    with pytest.raises(CheckpointError, match="xl.safetensors: an SDXL embedding"):
        load_embedding(xl, TINY_SD1)
    single = write(tmp_path / "sd1.safetensors", {"emb_params": vectors(1)})
    with pytest.raises(CheckpointError, match="sd1.safetensors: an embedding for one text encoder"):
        load_embedding(single, TWO_ENCODERS)


def test_wrong_width_names_the_file_and_both_widths(tmp_path):
    path = write(tmp_path / "wide.safetensors", {"emb_params": vectors(2, 768)})
    with pytest.raises(CheckpointError, match=r"wide.safetensors: vectors of width 768, .* takes 128"):
        load_embedding(path, TINY_SD1)


def test_unknown_layout_is_a_clear_error(tmp_path):
    path = write(tmp_path / "odd.safetensors", {"a": vectors(1), "b": vectors(1)})
    with pytest.raises(CheckpointError, match="odd.safetensors: not a textual-inversion embedding"):
        load_embedding(path, TINY_SD1)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickles_are_refused_as_pickle_checkpoints_are(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(b"\x80\x02anything")
    library = EmbeddingLibrary(tmp_path)
    with pytest.raises(CheckpointError, match="pickles"):
        library.used_in(["a evil cat"], TINY_SD1)


def test_library_finds_whole_words_and_the_embedding_prefix_case_insensitively(tmp_path):
    write(tmp_path / "MyStyle.safetensors", {"emb_params": vectors(2)})
    write(tmp_path / "other.safetensors", {"emb_params": vectors(1)})
    library = EmbeddingLibrary(tmp_path)
    assert set(library.used_in(["a cat in mystyle, red"], TINY_SD1)) == {"MyStyle"}
    assert set(library.used_in(["embedding:MyStyle"], TINY_SD1)) == {"MyStyle"}
    assert library.used_in(["mystyles and othered"], TINY_SD1) == {}
    assert set(library.used_in(["x", "(other:1.2)"], TINY_SD1)) == {"other"}
    assert library.missing("embedding:MyStyle, embedding:nothere") == ["nothere"]


def test_ti_hashes_are_the_first_12_hex_digits_of_the_files_sha256(tmp_path):
    path = write(tmp_path / "style.safetensors", {"emb_params": vectors(2)})
    write(tmp_path / "other.safetensors", {"emb_params": vectors(1)})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    library = EmbeddingLibrary(tmp_path)
    assert library.hashes(["a style cat", "ugly"], TINY_SD1) == f"style: {digest[:12]}"
    assert library.hashes(["a cat"], TINY_SD1) is None


def test_default_folder_is_embeddings_in_the_weights_folder():
    assert default_embeddings_dir() == weights_dir() / "embeddings"
    assert EmbeddingLibrary().files == {}  # absent folder: no embeddings, no error
