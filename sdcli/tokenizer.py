"""CLIP BPE tokenizer for the SD 1.x text encoder, built from the vocabulary shipped in sdcli/data/.

The two files (`vocab.json`, `merges.txt`) are generated once by `scripts/make_clip_vocab.py` from
OpenAI's `bpe_simple_vocab_16e6.txt.gz`, so tokenizing a prompt never needs the Hugging Face Hub.
The BPE itself is `transformers.CLIPTokenizer`: the same code diffusers and A1111 use, which is what the
parity tests compare against.

torch and transformers are imported inside the functions that need them, so importing this module (and
`sdcli`) stays cheap for `sdcli --help`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
VOCAB_FILES = ("vocab.json", "merges.txt")

CONTEXT_LENGTH = 77
START_TOKEN_ID = 49406  # <|startoftext|>
END_TOKEN_ID = 49407  # <|endoftext|>
COMMA_TOKEN_ID = 267  # ",</w>": where A1111 prefers to end a 75-token chunk
VOCAB_SIZE = 49408


def _load_hf_tokenizer(data_dir: Path):
    """Build `transformers.CLIPTokenizer` from the packaged vocabulary files, offline."""
    missing = [name for name in VOCAB_FILES if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CLIP vocabulary file(s) {', '.join(missing)} missing from {data_dir}; "
            "regenerate them with scripts/make_clip_vocab.py"
        )
    from transformers import CLIPTokenizer

    # from_pretrained on the folder, not CLIPTokenizer(vocab_file=..., merges_file=...): in transformers
    # v5 the constructor ignores those keywords and silently builds a 3-token vocabulary; loading the
    # folder works in v4 and v5 alike. local_files_only keeps it off the network even without
    # HF_HUB_OFFLINE.
    return CLIPTokenizer.from_pretrained(str(data_dir), local_files_only=True)


class ClipTokenizer:
    """Prompt -> CLIP token ids, truncated and padded to a fixed context length.

    Each row is `<|startoftext|> tokens... <|endoftext|>` followed by `pad_token_id`. A prompt longer than
    `max_length - 2` tokens is cut so the start and end tokens survive, as the text encoder reads its
    pooled output at the end token. SD 1.x pads with the end token (49407), as diffusers' SD 1.5
    tokenizer and A1111 do; SD 2.x's OpenCLIP tokenizer pads with 0 instead.
    """

    def __init__(self, max_length: int = CONTEXT_LENGTH, pad_token_id: int = END_TOKEN_ID) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        if not 0 <= pad_token_id < VOCAB_SIZE:
            raise ValueError(f"pad_token_id must be a CLIP token id in [0, {VOCAB_SIZE}), got {pad_token_id}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._tokenizer = _load_hf_tokenizer(DATA_DIR)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt with start and end tokens, truncated to `max_length`, unpadded.

        CLIP's text cleanup applies: Unicode NFC, runs of whitespace collapsed, lower-casing.
        """
        if isinstance(prompts, str):
            # A bare string would be tokenized as one prompt by Hugging Face but is almost always a
            # caller's mistake for [prompt]; say so rather than guess.
            raise TypeError("prompts must be a sequence of strings, not a single string")
        if not prompts:
            return []
        encoded = self._tokenizer(list(prompts), truncation=True, max_length=self.max_length)
        return encoded["input_ids"]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without start and end tokens and without truncation.

        This is what chunking long prompts needs (A1111 tokenizes each emphasis run this way); the same
        text cleanup as `encode` applies.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        if not texts:
            return []
        # verbose=False: Hugging Face would warn about texts longer than 77 tokens, which are expected here.
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
        return encoded["input_ids"]

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's BPE text, for showing how a prompt was read: `photo</w>` (a word's end) as `photo`."""
        return [token.removesuffix("</w>") for token in self._tokenizer.convert_ids_to_tokens(list(ids))]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Tokenize a batch of prompts into a (B, max_length) int64 tensor."""
        import torch

        rows = self.encode(prompts)
        ids = torch.full((len(rows), self.max_length), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The SD 1.x tokenizer (77 ids, padded with 49407), built on first use and then reused."""
    return ClipTokenizer()


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Tokenize prompts for SD 1.x: a (B, 77) int64 tensor, see `ClipTokenizer`."""
    return default_tokenizer()(prompts)
