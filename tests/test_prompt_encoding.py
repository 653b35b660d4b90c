"""Prompt encoding pieces: which step a denoiser call belongs to, batching prompts of different lengths,
guidance at two lengths, encoded shapes, the long-prompt limit, and what --show-tokens and the warnings say."""

import pytest
import torch
from conftest import run_cli

from sdcli.checkpoint import load_model
from sdcli.conditioning import TextConditioning
from sdcli.denoiser import guided_unet
from sdcli.families import SD1
from sdcli.prompt_encoding import (
    _stack,
    describe_prompt,
    encode_schedule,
    encode_texts,
    prompt_warnings,
)
from sdcli.tokenizer import ClipTokenizer


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_rows_of_different_lengths_repeat_their_last_vector_as_a1111s_stack_conds():
    short, long = torch.randn(1, 77, 4), torch.randn(1, 154, 4)
    batch = _stack([TextConditioning(short), TextConditioning(long)])
    assert batch.context.shape == (2, 154, 4)
    assert torch.equal(batch.context[0, :77], short[0]) and torch.equal(batch.context[1], long[0])
    assert torch.equal(batch.context[0, 77:], short[0, -1:].expand(77, 4))


def test_guidance_runs_cond_and_uncond_apart_when_their_lengths_differ():
    calls = []

    def unet(x, t, text):
        calls.append(text.context.shape)
        return x * text.context.mean()

    x, t = torch.ones(1, 4, 2, 2), torch.tensor([500.0])
    cond, uncond = TextConditioning(torch.full((1, 154, 8), 2.0)), TextConditioning(torch.full((1, 77, 8), 1.0))
    out = guided_unet(unet, cond, uncond, 7.0)(x, t)
    assert calls == [(1, 77, 8), (1, 154, 8)]
    assert torch.allclose(out, x * (1 + 7.0 * (2 - 1)))
    calls.clear()
    guided_unet(unet, cond, TextConditioning(torch.ones(1, 154, 8)), 7.0)(x, t)
    assert calls == [(2, 154, 8)]  # equal lengths: one batch


def test_encoded_length_is_77_per_chunk_and_texts_encoded_together_share_it(model):
    assert encode_texts(model, ["a cat"]).context.shape == (1, 77, 128)
    long = ", ".join(["a red cat"] * 30)  # 119 tokens: 2 chunks
    assert encode_texts(model, [long]).context.shape == (1, 154, 128)
    assert encode_texts(model, ["a cat", long]).context.shape == (2, 154, 128)


def test_schedule_encodes_each_distinct_text_once_and_picks_a1111s_segment(model):
    scheduled = encode_schedule(model, ["a [cat:dog:2]", "a cow"], 4)
    # A1111: at step s (from 0), the first segment whose end step is >= s; "cat" ends at step 2.
    assert scheduled.step_batch == (0, 0, 0, 1)
    assert len(scheduled.batches) == 2 and len(scheduled.at(0)) == 2
    assert torch.equal(scheduled.at(0).context[1], scheduled.at(3).context[1])  # "a cow" throughout


def test_a_prompt_past_1000_tokens_is_a_clear_error(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "cat " * 1001, "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", 1, "-o",
                     tmp_path / "x.png")  # fmt: skip
    assert result.exit_code == 1
    assert "1001 tokens long; at most 1000" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_describe_prompt_shows_segments_chunks_weights_and_embeddings():
    spec = SD1.text_encoders[0]
    style = {"style": torch.zeros(2, 768)}
    lines = describe_prompt("a (cat:1.5) in style [red|blue] BREAK sky", 2, spec, ClipTokenizer(), style)
    assert lines == [
        "steps 1-1: a (cat:1.5) in style red BREAK sky",
        "  chunk 1/2, 6 tokens: a cat:1.5 in <style> red",
        "  chunk 2/2, 1 tokens: sky",
        "steps 2-2: a (cat:1.5) in style blue BREAK sky",
        "  chunk 1/2, 6 tokens: a cat:1.5 in <style> blue",
        "  chunk 2/2, 1 tokens: sky",
    ]


def test_warnings_for_extreme_weights_and_missing_embeddings_only():
    assert prompt_warnings("a (cat:1.5), [dog], (big:3.0)", []) == []
    assert prompt_warnings("a (cat:3.5)", ["nothere"]) == [
        "embedding 'nothere' not found: the words are read as text",
        "'cat' has weight 3.5: above 3 images burn out",
    ]
    assert prompt_warnings("[a:(hot:4):3]", []) == ["'hot' has weight 4: above 3 images burn out"]  # after an edit


def test_tokens_command_and_show_tokens(tiny_checkpoint, tmp_path):
    result = run_cli("tokens", "a (cat:4), embedding:nothere")
    assert result.exit_code == 0, result.output
    assert "chunk 1/1, 8 tokens: a cat:4 , embed ding : no there" in result.stdout
    assert "warning: embedding 'nothere' not found" in result.stderr and "has weight 4" in result.stderr
    result = run_cli("txt2img", "a (cat:1.2)", "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", 1,
                     "--show-tokens", "-o", tmp_path / "x.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "prompt: a (cat:1.2)\n  chunk 1/1, 2 tokens: a cat:1.2" in result.stderr


def test_lora_tags_are_left_as_text_for_whoever_strips_them():
    from sdcli.prompt_parser import parse_prompt_attention, prompt_schedule

    assert parse_prompt_attention("a <lora:my_lora:0.8> cat") == [("a <lora:my_lora:0.8> cat", 1.0)]
    assert prompt_schedule("<lora:x:1> [cat:dog:2]", 4) == [(2, "<lora:x:1> cat"), (4, "<lora:x:1> dog")]
