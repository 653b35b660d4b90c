"""The OpenCLIP text tower (and CLIP-L's `encode`) equal transformers' CLIP on the same random weights, in fp32.

Our state dicts go through diffusers' own `convert_open_clip_checkpoint` under SD 2.x's and SDXL's prefixes.
"""

import pytest
import torch
from conftest import TINY_CLIPS, randomize_
from reference import assert_close, reference_clip_sdxl, reference_open_clip

from sdcli.models.clip import ClipTextModel
from sdcli.models.configs import OpenClipConfig
from sdcli.models.openclip import OpenClipTextModel

SD2_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders.1.model."
# Two sizes that differ in width, depth, heads, sequence length and projection width.
TINY_OPENCLIPS = {
    "a": OpenClipConfig(1000, context_length=77, width=64, layers=3, heads=2, mlp_width=256, projection_dim=48),
    "b": OpenClipConfig(500, context_length=16, width=96, layers=4, heads=3, mlp_width=160, projection_dim=96),
}


def random_tower(cfg: OpenClipConfig, seed: int) -> OpenClipTextModel:
    model = randomize_(OpenClipTextModel(cfg), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # layer norms as scales near 1 (randomize_ knows them by the name "norm")
        for name, p in model.named_parameters():
            if ".ln_" in f".{name}" and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def token_ids(vocab_size: int, length: int, ends: list[int], pad: int) -> torch.Tensor:
    """Rows of random ordinary tokens, the end token (the largest id) at `ends[i]`, then `pad`."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size - 2, (len(ends), length), generator=g)
    for row, end in enumerate(ends):
        ids[row, end] = vocab_size - 1
        ids[row, end + 1 :] = pad
    return ids


@pytest.mark.parametrize("name", sorted(TINY_OPENCLIPS))
def test_openclip_sd2_context_matches_transformers(name):
    cfg = TINY_OPENCLIPS[name]
    ours = random_tower(cfg, seed=4)
    ref, _ = reference_open_clip(ours.state_dict(), cfg, SD2_PREFIX)
    ids = token_ids(cfg.vocab_size, cfg.context_length, [5, cfg.context_length - 1], pad=0)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        # SD 2.x: the penultimate layer, then ln_final.
        hidden, pooled = ours(ids, layer=-2, final_norm=True)
        assert pooled is None
        assert_close(hidden, ref.final_layer_norm(out.hidden_states[-2]))
        assert_close(ours(ids, layer=-1)[0], out.last_hidden_state)


@pytest.mark.parametrize("name", sorted(TINY_OPENCLIPS))
def test_openclip_sdxl_context_and_pooled_match_transformers(name):
    cfg = TINY_OPENCLIPS[name]
    ours = random_tower(cfg, seed=5)
    ref, ignored = reference_open_clip(ours.state_dict(), cfg, SDXL_PREFIX)
    assert not ignored
    ids = token_ids(cfg.vocab_size, cfg.context_length, [3, 9, cfg.context_length - 1], pad=0)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        # SDXL: the penultimate layer without ln_final; pooled = ln_final(last)[end token] @ text_projection.
        hidden, pooled = ours(ids, layer=-2, final_norm=False, pooled=True)
        assert_close(hidden, out.hidden_states[-2])
        assert_close(pooled, out.text_embeds)
        assert_close(ours(ids, layer=-3, final_norm=False)[0], out.hidden_states[-3])


@pytest.mark.parametrize("name", sorted(TINY_CLIPS))
def test_clip_encode_penultimate_without_norm_and_pooled_match_transformers(name):
    cfg = TINY_CLIPS[name]
    ours = randomize_(ClipTextModel(cfg), seed=6)
    ref = reference_clip_sdxl(ours.state_dict(), cfg)
    # CLIP-L pads with its end token: the pooled state is at the first one.
    ids = token_ids(cfg.vocab_size, cfg.max_position_embeddings, [4, cfg.max_position_embeddings - 1], pad=0)
    ids[ids == 0] = cfg.vocab_size - 1  # transformers pools at the first end token (its config's eos id)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours.encode(ids, layer=-2, final_norm=False, pooled=True)
        assert_close(hidden, out.hidden_states[-2])
        assert_close(pooled, out.pooler_output)
        assert_close(ours.encode(ids, layer=-2)[0], ours(ids, clip_skip=2))


@pytest.mark.parametrize("layer", [0, -4, 1])
def test_layer_out_of_range_is_an_error(layer):
    model = OpenClipTextModel(TINY_OPENCLIPS["a"])
    with pytest.raises(ValueError, match="layer"):
        model(torch.zeros(1, 77, dtype=torch.long), layer=layer)
