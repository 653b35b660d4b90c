"""Tests for sdcli.tokenizer and the CLIP vocabulary files shipped in sdcli/data/.

No reference CLIP tokenizer is available offline, so the expected ids below are published tokenizations
of OpenAI's CLIP BPE (every OpenAI CLIP model, ViT-B/32 and ViT-L/14 alike, shares one vocabulary),
each cited where it is used, or are derived from the recipe in a comment next to them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdcli.tokenizer import DATA_DIR, END_TOKEN_ID, START_TOKEN_ID, ClipTokenizer, tokenize

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_a_photo_of_a_cat_is_start_words_end_then_end_token_padding():
    ids = tokenize(["a photo of a cat"])
    # Published ids: elixir-nx/bumblebee test/bumblebee/text/clip_tokenizer_test.exs (tokenizer loaded
    # from openai/clip-vit-base-patch32); SD 1.x pads with the end token.
    expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70
    assert ids.dtype == torch.int64
    assert ids.tolist() == [expected]


def test_long_prompt_is_truncated_to_77_keeping_start_and_end_tokens():
    ids = tokenize(["a " * 100])
    # 'a</w>' is 320 (see the test above): 75 of them fit between the start and end tokens.
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == [START_TOKEN_ID] + [320] * 75 + [END_TOKEN_ID]


def test_batch_of_two_prompts_has_shape_2_by_77():
    ids = tokenize(["a photo of a cat", "a photo of a dog"])
    assert ids.shape == (2, 77)
    # Second row: same bumblebee test as above.
    assert ids[1, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_packaged_vocab_has_49408_entries_and_merges_has_48894_lines():
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (DATA_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 48894
    assert vocab["<|startoftext|>"] == START_TOKEN_ID
    assert vocab["<|endoftext|>"] == END_TOKEN_ID


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        # Entries of a public copy of the Hugging Face CLIP vocab.json (sorted, indent-2 layout of
        # save_pretrained): MataoranYay/mini-stable-diffusion-from-scratch tokenizer/vocab.json.
        ("!!", 1443),
        ("a</w>", 320),
        ("about</w>", 781),
        ("aaron</w>", 7709),
        ("absolutely</w>", 4703),
        ("aamaadmiparty</w>", 46406),
        ("acadia</w>", 49236),
        # GPT-2 byte mapping: the 188 printable bytes come first, then byte 0 as chr(256) ('Ā'); the
        # '</w>' copies of the 256 byte symbols follow, so 'Ā</w>' is 256 + 188.
        ("Ā", 188),
        ("Ā</w>", 444),
    ],
)
def test_vocab_entries_match_published_clip_vocabulary(token: str, token_id: int):
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[token] == token_id


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # openai/CLIP clip.tokenize output in nishio/external_brain_in_markdown pages/CLIP.md; "bozuman"
        # is not a word, so it checks the merge ranks.
        ("a painting of a cat", [49406, 320, 3086, 539, 320, 2368, 49407]),
        ("bozuman", [49406, 647, 4091, 786, 49407]),
        # zer0int/CLIP-tokenizer README.md: 'n</w>', 'kab', 'rie</w>' -> 333, 6554, 5322.
        ("n kabrie", [49406, 333, 6554, 5322, 49407]),
        # elixir-nx/bumblebee test/bumblebee/text/clip_tokenizer_test.exs.
        ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),
    ],
)
def test_known_prompts_give_published_clip_ids(clip_tokenizer: ClipTokenizer, prompt: str, expected: list[int]):
    assert clip_tokenizer.encode([prompt]) == [expected]


def test_mixed_script_text_matches_transformers_integration_ids(clip_tokenizer: ClipTokenizer):
    # Input string and ids from transformers v5's tests/models/clip/test_tokenization_clip.py
    # (integration_expected_token_ids, openai/clip-vit-base-patch32): digits, accents, CJK, Thai,
    # runs of whitespace and newlines, and '<s>' that is not a CLIP special token.
    text = (
        "This is a test\nI was born in 92000, and this is falsé.\n生活的真谛是\n"
        "Hi  Hello\nHi   Hello\n\n \n  \n Hello\n<s>\nhi<s>there\n"
        "The following string should be properly encoded: Hello.\n"
        "But ird and ปี   ird   ด\nHey how are you doing"
    )
    expected = [
        49406, 589, 533, 320, 1628, 328, 739, 2683, 530, 280, 273, 271, 271, 271, 267, 537, 589, 533, 2778,
        82, 4166, 269, 33375, 162, 112, 119, 163, 248, 226, 41570, 164, 108, 249, 42891, 363, 1883, 3306,
        1883, 3306, 3306, 283, 338, 285, 1883, 283, 338, 285, 997, 518, 3473, 9696, 1535, 655, 12560, 524,
        33703, 281, 3306, 269, 767, 2770, 537, 1777, 505, 20278, 2770, 38825, 2189, 829, 631, 592, 1960,
        49407,
    ]  # fmt: skip
    assert clip_tokenizer.encode([text]) == [expected]


def test_case_and_whitespace_are_normalized_like_clip(clip_tokenizer: ClipTokenizer):
    # CLIP lower-cases and collapses whitespace (open_clip's whitespace_clean + lower).
    messy, clean = clip_tokenizer(["  A PHOTO\n of a \t Cat ", "a photo of a cat"])
    assert messy.tolist() == clean.tolist()


def test_pad_token_id_zero_pads_with_zeros_after_the_end_token():
    ids = ClipTokenizer(pad_token_id=0)(["a cat"])
    # SD 2.x's OpenCLIP tokenizer pads with 0; the end token itself stays 49407.
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert ids[0, 4:].eq(0).all()


def test_empty_batch_gives_zero_rows(clip_tokenizer: ClipTokenizer):
    assert clip_tokenizer([]).shape == (0, 77)


def test_single_string_is_rejected(clip_tokenizer: ClipTokenizer):
    with pytest.raises(TypeError, match="sequence of strings"):
        clip_tokenizer("a photo of a cat")


def test_vocab_files_agree_with_openai_recipe():
    # Rebuild the vocabulary from merges.txt with the generator script's recipe: the two packaged files
    # must be consistent (ids are positions in bytes + bytes</w> + merges + specials).
    script = REPO_ROOT / "scripts" / "make_clip_vocab.py"
    spec = importlib.util.spec_from_file_location("make_clip_vocab", script)
    assert spec is not None and spec.loader is not None
    make_clip_vocab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_clip_vocab)
    merges_text = (DATA_DIR / "merges.txt").read_text(encoding="utf-8")
    vocab, merges = make_clip_vocab.build_vocab_and_merges(merges_text)
    assert vocab == json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert merges == merges_text.splitlines()[1:]


def test_importing_tokenizer_module_imports_neither_torch_nor_transformers():
    # A fresh interpreter: this test process has already imported torch.
    code = "import sys, sdcli.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
