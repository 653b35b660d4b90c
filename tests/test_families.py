"""Detection in two steps: what the header shows (measure), then the family table (match); a damaged
header is a one-line CheckpointError, never a traceback."""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_SD1, tiny_state_dict
from safetensors.torch import save_file

from sdcli.checkpoint import load_model
from sdcli.errors import CheckpointError
from sdcli.families import CLIP_PREFIX, FAMILY_TABLE, SD1, UNET_PREFIX, Signature, detect, match, measure

SMALL = replace(  # TINY_SD1 with a small vocabulary: a checkpoint file of about 1 MB
    TINY_SD1,
    text_encoders=(
        replace(TINY_SD1.text_encoders[0], config=replace(TINY_SD1.text_encoders[0].config, vocab_size=1000)),
    ),
)


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    return tiny_state_dict(SMALL)


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_measure_reads_what_tells_families_apart(small_state):
    measured = measure(shapes_of(small_state))
    assert (measured.unet_in_channels, measured.unet_out_channels, measured.model_channels) == (4, 4, 32)
    assert (measured.context_dim, measured.adm_in_channels, measured.linear_proj) == (128, None, False)
    ((tower),) = measured.text_encoders
    assert (tower.prefix, tower.kind, tower.width, tower.depth) == (CLIP_PREFIX, "clip", 128, 2)


def test_match_finds_sd1_and_its_inpainting_variant_by_signature(small_state):
    measured = measure(shapes_of(small_state))
    assert match(measured) is SD1
    assert match(replace(measured, unet_in_channels=9)).name == "sd1-inpaint"
    assert FAMILY_TABLE[Signature((CLIP_PREFIX,), 4)] is SD1
    assert detect(shapes_of(small_state)) == SMALL  # sizes from the shapes, head counts from the family


def test_unknown_layout_says_what_it_found(small_state):
    shapes = shapes_of(small_state)
    shapes[UNET_PREFIX + "input_blocks.0.0.weight"] = (32, 5, 3, 3)
    with pytest.raises(CheckpointError) as info:
        detect(shapes)
    message = str(info.value)
    assert "\n" not in message and "unknown checkpoint layout" in message
    assert "taking 5 channels" in message and "128-wide context" in message
    assert "cond_stage_model.transformer.* (clip, 128 wide, 2 layers)" in message and "sd1, sd1-inpaint" in message


def renamed(shapes: dict, old: str, new: str) -> dict:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in shapes.items()}


def open_clip_tower(prefix: str, width: int = 64) -> dict:
    return {
        prefix + "token_embedding.weight": (1000, width),
        prefix + "positional_embedding": (77, width),
        prefix + "transformer.resblocks.0.attn.in_proj_weight": (3 * width, width),
        prefix + "transformer.resblocks.0.mlp.c_fc.weight": (4 * width, width),
        prefix + "ln_final.weight": (width,),
        prefix + "text_projection": (width, 32),
    }


def test_sd2_sdxl_and_sdxl_refiner_layouts_are_detected(small_state):
    sd1 = shapes_of(small_state)
    without_clip = {k: v for k, v in sd1.items() if not k.startswith(CLIP_PREFIX)}
    sd2 = without_clip | open_clip_tower("cond_stage_model.model.")
    sdxl = renamed(sd1, CLIP_PREFIX, "conditioner.embedders.0.transformer.") | open_clip_tower(
        "conditioner.embedders.1.model."
    )
    sdxl[UNET_PREFIX + "label_emb.0.0.weight"] = (128, 2816)
    refiner = without_clip | open_clip_tower("conditioner.embedders.0.model.")
    refiner[UNET_PREFIX + "label_emb.0.0.weight"] = (128, 2560)
    assert detect(sd2).name == "sd2" and detect(sd2).text_encoders[0].config.width == 64
    found = detect(sdxl)
    assert (found.name, found.scale_factor, found.default_size) == ("sdxl", 0.13025, 1024)
    assert [type(s.config).__name__ for s in found.text_encoders] == ["ClipConfig", "OpenClipConfig"]
    found = detect(refiner)
    assert (found.name, found.scale_factor, found.zero_missing_negative, found.aesthetic_score) == (
        "sdxl-refiner", 0.13025, False, True,
    )  # fmt: skip
    assert [s.prefix for s in found.text_encoders] == ["conditioner.embedders.0.model."]
    assert found.unet.adm_in_channels == 2560
    without_label = {k: v for k, v in refiner.items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        detect(without_label)
    assert measure(sdxl).adm_in_channels == 2816
    assert [t.kind for t in measure(sdxl).text_encoders] == ["clip", "open_clip"]


class RecordingShapes(dict):
    """The header's shapes, noting each key whose shape detection reads."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def read_by_detection(state) -> list[str]:
    shapes = RecordingShapes(shapes_of(state))
    detect(shapes)
    return sorted(k for k in shapes.read if k in state)


CORRUPTIONS = {
    "missing": None,
    "one dimension fewer": lambda t: t.reshape(-1)[: max(1, t.shape[0])] if t.dim() > 1 else t.reshape(()),
    "one dimension more": lambda t: t[None],
    "empty": lambda t: t[:0],
    "one more channel": lambda t: torch.cat([t, t[:1]]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_damaged_tensors_that_detection_reads_give_a_one_line_error(tmp_path, small_state, corruption):
    keys = read_by_detection(small_state)
    assert len(keys) >= 10  # the UNet's, the VAE's and the text encoder's
    for key in keys:
        state = dict(small_state)
        if CORRUPTIONS[corruption] is None:
            del state[key]
        else:
            state[key] = CORRUPTIONS[corruption](state[key]).clone()
        path = tmp_path / "damaged.safetensors"
        save_file(state, str(path))
        try:
            load_model(path)
        except CheckpointError as e:
            assert "\n" not in str(e), (key, str(e))
        else:  # only a size the networks read from that very tensor (vocabulary, context length) may change
            assert corruption == "one more channel" and "embedding" in key, key
