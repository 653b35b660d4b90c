"""Text encoders driven by their specs: the layer, final norm and pooled output each spec asks for equal
transformers' CLIPTextModel on the same weights; several encoders combine into one TextConditioning."""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_CLIPS, TINY_SD1, randomize_
from reference import assert_close, reference_clip

from sdcli.errors import UsageError
from sdcli.families import CLIP_PREFIX, SD1, TextEncoderSpec
from sdcli.models.clip import ClipTextModel
from sdcli.text_encoders import build_text_encoder, combine_outputs, make_tokenizer, run_text_encoder


def prompt_ids(cfg, batch=2, seed=0) -> torch.Tensor:
    """Rows of random tokens, each ending at a different place in the end token (the highest id) + padding."""
    end = cfg.vocab_size - 1  # the reference config's eos_token_id
    ids = torch.randint(0, end, (batch, cfg.max_position_embeddings), generator=torch.Generator().manual_seed(seed))
    for row, length in enumerate((5, 9)[:batch]):
        ids[row, length:] = end
    return ids


@pytest.mark.parametrize("name", sorted(TINY_CLIPS))
@pytest.mark.parametrize(
    "layer,final_norm,clip_skip",
    [(-1, True, 1), (-1, True, 2), (-2, False, 1), (-2, True, 1), (-1, False, 1)],
)
def test_spec_layer_and_final_norm_equal_transformers_hidden_states(name, layer, final_norm, clip_skip):
    cfg = TINY_CLIPS[name]
    spec = TextEncoderSpec(CLIP_PREFIX, cfg, layer=layer, final_norm=final_norm, pooled=True)
    ours = randomize_(build_text_encoder(spec), seed=3)
    ref = reference_clip(ours.state_dict(), cfg)
    ids = prompt_ids(cfg)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden = out.hidden_states[layer - (clip_skip - 1)]
        expected = ref.final_layer_norm(hidden) if final_norm else hidden
        context, pooled = run_text_encoder(ours, spec, ids, clip_skip)
    assert_close(context, expected)
    assert_close(pooled, out.pooler_output)


def test_sd1_spec_gives_what_the_clip_module_gives():
    spec = TINY_SD1.text_encoders[0]
    module = randomize_(ClipTextModel(spec.config), seed=4)
    ids = prompt_ids(spec.config)
    for clip_skip in (1, 2):
        context, pooled = run_text_encoder(module, spec, ids, clip_skip)
        assert pooled is None
        assert torch.equal(context, module(ids, clip_skip=clip_skip))


def test_sd1_encoder_is_clip_l_last_layer_normed_padded_with_the_end_token():
    (spec,) = SD1.text_encoders
    assert (spec.prefix, spec.layer, spec.final_norm, spec.pooled, spec.pad_id) == (CLIP_PREFIX, -1, True, False, 49407)
    assert (spec.config.hidden_size, spec.config.num_hidden_layers) == (768, 12) and spec.max_clip_skip == 12


def test_clip_skip_beyond_the_tower_is_a_usage_error():
    spec = replace(TINY_SD1.text_encoders[0], layer=-2)  # 2 layers, penultimate: only clip skip 1 fits
    module = ClipTextModel(spec.config)
    with pytest.raises(UsageError, match="between 1 and 1"):
        run_text_encoder(module, spec, torch.zeros(1, 77, dtype=torch.long), clip_skip=2)


def test_outputs_combine_contexts_on_the_feature_axis_and_keep_the_pooled_one():
    a, b, pooled = torch.randn(2, 7, 3), torch.randn(2, 7, 5), torch.randn(2, 4)
    combined = combine_outputs([(a, None), (b, pooled)])
    assert torch.equal(combined.context, torch.cat([a, b], dim=-1)) and torch.equal(combined.pooled, pooled)
    assert combine_outputs([(a, None)]).pooled is None


def test_tokenizer_pads_with_the_spec_pad_id():
    spec = replace(TINY_SD1.text_encoders[0], pad_id=0)
    ids = make_tokenizer(spec)(["a cat"])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 0 and 49407 in ids[0].tolist()
    assert make_tokenizer(TINY_SD1.text_encoders[0])(["a cat"])[0, -1].item() == 49407
