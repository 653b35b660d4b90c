"""Tests for sdcli.prompt_chunks (A1111's 75-token chunks, comma backtracking, BREAK, embeddings, emphasis)
and the tokenizer hook it uses (`ClipTokenizer.token_ids`).

Chunking is checked with a word-per-token fake tokenizer, so each expected row can be derived by hand from
A1111's rules (its `tokenize_line` in modules/sd_hijack_clip.py, as the module docstring states them); the
derivation is written beside each case. The emphasis formula is A1111's `EmphasisOriginal`, written out in
the test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch

from sdcli.errors import UsageError
from sdcli.prompt_chunks import (
    CHUNK_TOKENS,
    EmbeddingSlot,
    apply_emphasis,
    chunk_prompt,
    chunk_tensors,
)
from sdcli.prompt_parser import BREAK, parse_prompt_attention
from sdcli.tokenizer import COMMA_TOKEN_ID, END_TOKEN_ID, START_TOKEN_ID, ClipTokenizer

S, E = START_TOKEN_ID, END_TOKEN_ID
COMMA = COMMA_TOKEN_ID


def word_id(word: str) -> int:
    """The fake vocabulary: 'w7' is token 1007, ',' is CLIP's comma, any other word a fixed id below 1000."""
    if word == ",":
        return COMMA
    if word.startswith("w") and word[1:].isdigit():
        return 1000 + int(word[1:])
    return {"a": 1, "cat": 2, "dog": 3, "my": 4, "emb": 5, "embedding": 6, ":": 7, "BREAK": 8}[word]


def fake_tokenize(texts: Sequence[str]) -> list[list[int]]:
    """One token per word, ',' and ':' (no start/end tokens, no truncation), like `ClipTokenizer.token_ids`."""
    return [[word_id(word) for word in re.findall(r"[^\s,:]+|[,:]", text)] for text in texts]


def words(first: int, last: int) -> str:
    return " ".join(f"w{n}" for n in range(first, last + 1))


def ids(first: int, last: int) -> list[int]:
    return [1000 + n for n in range(first, last + 1)]


def row(content: list[int], pad: int = E) -> list[int]:
    """A chunk's 77 ids: start, the content, end, then padding."""
    return [S, *content, E] + [pad] * (CHUNK_TOKENS - len(content))


def chunk_ids(prompt: str, **kwargs) -> list[list[int]]:
    chunks = chunk_prompt(parse_prompt_attention(prompt), fake_tokenize, pad_id=E, **kwargs)
    return [list(chunk.tokens) for chunk in chunks]


def test_short_prompt_is_one_chunk_of_77_padded_with_the_end_token():
    (chunk,) = chunk_prompt([("a cat", 1.0)], fake_tokenize, pad_id=E)
    assert list(chunk.tokens) == [S, 1, 2, E] + [E] * 73
    assert chunk.weights == (1.0,) * 77
    assert chunk.token_count == 2
    assert chunk.embeddings == ()


def test_openclip_pads_with_zero_after_the_end_token():
    (chunk,) = chunk_prompt([("a cat", 1.0)], fake_tokenize, pad_id=0)
    assert list(chunk.tokens) == [S, 1, 2, E] + [0] * 73


def test_each_token_carries_its_runs_weight_and_start_end_padding_weigh_1():
    (chunk,) = chunk_prompt(parse_prompt_attention("a (cat:1.5) [dog]"), fake_tokenize, pad_id=E)
    # Runs 'a ' 1.0, 'cat' 1.5, ' ' 1.0, 'dog' 1/1.1: the space runs have no tokens.
    assert list(chunk.tokens[:5]) == [S, 1, 2, 3, E]
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, 1 / 1.1, 1.0)
    assert chunk.weights[5:] == (1.0,) * 72


def test_empty_prompt_is_one_chunk_of_start_end_and_padding():
    assert chunk_ids("") == [row([])]


def test_exactly_75_tokens_fit_one_chunk_and_the_76th_starts_a_second():
    assert chunk_ids(words(1, 75)) == [row(ids(1, 75))]
    assert chunk_ids(words(1, 76)) == [row(ids(1, 75)), row(ids(76, 76))]


def test_three_chunks_for_160_tokens_without_commas():
    # No comma: hard cuts after 75 and 150 tokens.
    assert chunk_ids(words(1, 160)) == [row(ids(1, 75)), row(ids(76, 150)), row(ids(151, 160))]


def test_chunk_ends_after_the_last_comma_when_it_is_within_20_tokens_of_the_end():
    # Tokens: w1..w70 (positions 0-69), ',' at position 70, w71..w80. The chunk is full after w74 (75 tokens);
    # at w75 the last comma is 75 - 70 = 5 <= 20 tokens back, so w71..w74 move to the next chunk.
    prompt = words(1, 70) + ", " + words(71, 80)
    assert chunk_ids(prompt) == [row([*ids(1, 70), COMMA]), row(ids(71, 80))]


def test_comma_exactly_20_tokens_back_still_moves_the_words_after_it():
    # ',' at position 55: 75 - 55 = 20 <= 20, so w56..w74 (19 tokens) move.
    prompt = words(1, 55) + ", " + words(56, 80)
    assert chunk_ids(prompt) == [row([*ids(1, 55), COMMA]), row(ids(56, 80))]


def test_comma_21_tokens_back_is_too_far_and_the_chunk_is_cut_at_75():
    # ',' at position 54: 75 - 54 = 21 > 20: a hard cut after 75 tokens (w1..w54, ',', w55..w74).
    prompt = words(1, 54) + ", " + words(55, 80)
    assert chunk_ids(prompt) == [row([*ids(1, 54), COMMA, *ids(55, 74)]), row(ids(75, 80))]


def test_only_the_last_comma_counts():
    # Commas at positions 60 and 70: the words after the later one move.
    prompt = words(1, 60) + ", " + words(61, 69) + ", " + words(70, 80)
    assert chunk_ids(prompt) == [row([*ids(1, 60), COMMA, *ids(61, 69), COMMA]), row(ids(70, 80))]


def test_a_comma_as_the_76th_token_opens_the_next_chunk():
    # The comma cannot join the full chunk; nothing moves, and the comma is the next chunk's first token.
    assert chunk_ids(words(1, 75) + ", " + words(76, 77)) == [row(ids(1, 75)), row([COMMA, *ids(76, 77)])]


def test_comma_backtracking_is_per_chunk():
    # The comma at position 10 of chunk 1 does not affect chunk 2, which is cut hard at 75.
    prompt = words(1, 10) + ", " + words(11, 160)
    first = [*ids(1, 10), COMMA, *ids(11, 74)]
    assert chunk_ids(prompt) == [row(first), row(ids(75, 149)), row(ids(150, 160))]


def test_moved_words_keep_their_weights():
    prompt = words(1, 70) + ", (" + words(71, 80) + ":1.3)"
    first, second = chunk_prompt(parse_prompt_attention(prompt), fake_tokenize, pad_id=E)
    assert second.tokens[:12] == (S, *ids(71, 80), E)
    assert second.weights[:12] == (1.0, *[1.3] * 10, 1.0)
    assert first.weights == (1.0,) * 77


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # wiki "BREAK keyword": BREAK fills the current chunk with padding and starts a new one.
        ("a cat BREAK a dog", [row([1, 2]), row([1, 3])]),
        # A BREAK at the end leaves nothing to put in a new chunk.
        ("a cat BREAK", [row([1, 2])]),
        # A BREAK at the start closes the empty first chunk: an all-padding chunk, then the text.
        ("BREAK a cat", [row([]), row([1, 2])]),
        # BREAK alone: one empty chunk, as an empty prompt.
        ("BREAK", [row([])]),
    ],
)
def test_break_starts_a_new_chunk(prompt: str, expected: list[list[int]]):
    assert chunk_ids(prompt) == expected


def test_break_in_a_full_chunk_does_not_add_an_empty_chunk():
    # 75 tokens close the chunk only when the next token arrives; BREAK closes it instead, once.
    assert chunk_ids(words(1, 75) + " BREAK a") == [row(ids(1, 75)), row([1])]


def test_embedding_name_becomes_its_vectors_with_the_runs_weight():
    runs = parse_prompt_attention("a (emb:1.2) cat")
    (chunk,) = chunk_prompt(runs, fake_tokenize, pad_id=E, embeddings={"emb": 3})
    # 'a' at 1, three placeholder ids (0) for the vectors at 2..4, 'cat' at 5.
    assert list(chunk.tokens[:7]) == [S, 1, 0, 0, 0, 2, E]
    assert chunk.weights[:7] == (1.0, 1.0, 1.2, 1.2, 1.2, 1.0, 1.0)
    assert chunk.embeddings == (EmbeddingSlot(position=2, name="emb", vectors=3),)
    assert chunk.token_count == 5


def test_embedding_name_of_several_tokens_and_comfyui_prefix():
    # 'my emb' is two tokens; 'embedding:emb' is ComfyUI's way to name 'emb'. The longest name wins.
    embeddings = {"my emb": 2, "emb": 1}
    (chunk,) = chunk_prompt([("a my emb embedding:emb emb", 1.0)], fake_tokenize, pad_id=E, embeddings=embeddings)
    assert list(chunk.tokens[:7]) == [S, 1, 0, 0, 0, 0, E]
    assert chunk.embeddings == (
        EmbeddingSlot(2, "my emb", 2),
        EmbeddingSlot(4, "emb", 1),
        EmbeddingSlot(5, "emb", 1),
    )


def test_embedding_vectors_are_not_split_between_chunks():
    # 73 tokens, then a 3-vector embedding: 73 + 3 > 75, so the chunk closes at 73 and the vectors open the next.
    (first, second) = chunk_prompt([(words(1, 73) + " emb", 1.0)], fake_tokenize, pad_id=E, embeddings={"emb": 3})
    assert list(first.tokens) == row(ids(1, 73))
    assert list(second.tokens[:5]) == [S, 0, 0, 0, E]
    assert second.embeddings == (EmbeddingSlot(1, "emb", 3),)


def test_comma_backtracking_moves_an_embedding_with_its_words():
    # w1..w70, ',', w71, emb (2 vectors), w72, ... : full after w71, emb, emb, w72 (75); the next token moves
    # positions 71.. (w71, the embedding, w72) to the second chunk, where the embedding starts at row index 2.
    prompt = words(1, 70) + ", w71 emb " + words(72, 80)
    first, second = chunk_prompt([(prompt, 1.0)], fake_tokenize, pad_id=E, embeddings={"emb": 2})
    assert list(first.tokens) == row([*ids(1, 70), COMMA])
    assert first.embeddings == ()
    assert list(second.tokens[:14]) == [S, 1071, 0, 0, *ids(72, 80), E]
    assert second.embeddings == (EmbeddingSlot(2, "emb", 2),)


def test_embedding_with_more_than_75_vectors_is_a_usage_error():
    with pytest.raises(UsageError, match="'emb' has 76 vectors"):
        chunk_prompt([("emb", 1.0)], fake_tokenize, pad_id=E, embeddings={"emb": 76})


def test_1000_tokens_are_accepted_and_1001_are_a_usage_error():
    assert len(chunk_prompt([(words(1, 1000), 1.0)], fake_tokenize, pad_id=E)) == 14  # ceil(1000 / 75)
    with pytest.raises(UsageError, match="1001 tokens long; at most 1000"):
        chunk_prompt([(words(1, 1001), 1.0)], fake_tokenize, pad_id=E)


def test_chunk_tensors_stack_ids_and_weights():
    chunks = chunk_prompt(parse_prompt_attention("(a) BREAK cat"), fake_tokenize, pad_id=E)
    ids_tensor, weights = chunk_tensors(chunks)
    assert ids_tensor.dtype == torch.long and ids_tensor.shape == (2, 77)
    assert weights.dtype == torch.float32 and weights.shape == (2, 77)
    assert ids_tensor[:, :3].tolist() == [[S, 1, E], [S, 2, E]]
    assert weights[0, 1].item() == pytest.approx(1.1)


def test_break_marker_is_a_break_only_with_its_weight():
    # The text "BREAK" with any other weight is a word to tokenize (8 in the fake vocabulary).
    assert [list(c.tokens) for c in chunk_prompt([("a", 1.0), BREAK], fake_tokenize, pad_id=E)] == [row([1])]
    (chunk,) = chunk_prompt([("a", 1.0), ("BREAK", 1.1)], fake_tokenize, pad_id=E)
    assert list(chunk.tokens) == row([1, 8])


# --- the real CLIP tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_token_ids_have_no_start_end_tokens_and_no_truncation(clip_tokenizer: ClipTokenizer):
    # 'a photo of a cat': elixir-nx/bumblebee test/bumblebee/text/clip_tokenizer_test.exs (ids between the
    # start and end tokens); 'a</w>' is 320.
    assert clip_tokenizer.token_ids(["a photo of a cat", "a " * 100, ""]) == [
        [320, 1125, 539, 320, 2368],
        [320] * 100,
        [],
    ]


def test_comma_token_id_is_clips_comma(clip_tokenizer: ClipTokenizer):
    # transformers' CLIP integration ids (see tests/test_tokenizer.py) read "92000, and" as 280 273 271 271
    # 271 267 537: the comma is 267.
    assert clip_tokenizer.token_ids(["92000, and"]) == [[280, 273, 271, 271, 271, COMMA_TOKEN_ID, 537]]


def test_token_ids_rejects_a_single_string(clip_tokenizer: ClipTokenizer):
    with pytest.raises(TypeError, match="sequence of strings"):
        clip_tokenizer.token_ids("a cat")


def test_weighted_prompt_through_clip_tokenizer(clip_tokenizer: ClipTokenizer):
    runs = parse_prompt_attention("a photo of a (cat:1.2)")
    (chunk,) = chunk_prompt(runs, clip_tokenizer.token_ids, pad_id=0)
    assert list(chunk.tokens[:8]) == [S, 320, 1125, 539, 320, 2368, E, 0]
    assert chunk.weights[:7] == (1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.0)


# --- "Original" emphasis ---------------------------------------------------------------------------------


def original_emphasis_formula(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's EmphasisOriginal.after_transformers, written out:
    original_mean = z.mean(); z = z * weights (broadcast over D); new_mean = z.mean(); z *= original_mean / new_mean
    """
    original_mean = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def test_apply_emphasis_equals_a1111_formula():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=generator) + 0.1
    weights = torch.ones(2, 77)
    weights[0, 3:6] = 1.21
    weights[1, 10] = 0.5
    torch.testing.assert_close(apply_emphasis(z, weights), original_emphasis_formula(z, weights), rtol=0, atol=0)


def test_apply_emphasis_keeps_the_mean_and_is_identity_for_unit_weights():
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    weights = torch.ones(1, 77)
    torch.testing.assert_close(apply_emphasis(z, weights), z)
    weights[0, 1:4] = 1.5
    out = apply_emphasis(z, weights)
    torch.testing.assert_close(out.mean(), z.mean())
    # Only the ratio between weighted and unweighted tokens changes.
    torch.testing.assert_close(out[0, 2] / out[0, 10], 1.5 * z[0, 2] / z[0, 10])


def test_apply_emphasis_returns_the_input_dtype_computed_in_float32():
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) + 0.5
    weights = torch.ones(1, 77)
    weights[0, 5] = 1.3
    out = apply_emphasis(z, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, original_emphasis_formula(z.float(), weights).to(torch.bfloat16))
