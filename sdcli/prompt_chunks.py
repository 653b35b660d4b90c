"""Long prompts as AUTOMATIC1111 reads them: weighted tokens in chunks of 75, and its "Original" emphasis.

CLIP reads 77 tokens: a start token, 75 tokens, an end token. A longer prompt is cut into chunks of 75
tokens that are encoded separately and whose contexts are concatenated (77 * k tokens), with A1111's rules
(`tokenize_line` in its modules/sd_hijack_clip.py):

- every token carries the weight of the emphasis run it came from (see `sdcli.prompt_parser`);
- a chunk that fills up moves the words after its last comma to the next chunk when that comma is among the
  last 20 tokens (A1111's `comma_padding_backtrack`), so a phrase is not split between two chunks;
- `BREAK` ends the current chunk;
- each chunk is `start, tokens..., end` then padding to 77, weight 1 outside the tokens; an empty prompt is
  one chunk.

The module needs no torch except inside `apply_emphasis` and `chunk_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdcli.errors import UsageError
from sdcli.prompt_parser import BREAK
from sdcli.tokenizer import COMMA_TOKEN_ID, END_TOKEN_ID, START_TOKEN_ID

if TYPE_CHECKING:
    import torch

CHUNK_TOKENS = 75  # tokens per chunk between the start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MAX_PROMPT_TOKENS = 1000
EMBEDDING_PREFIX = "embedding:"  # ComfyUI's way to name an embedding in a prompt
EMBEDDING_PLACEHOLDER_ID = 0  # token id under an embedding's vectors, which replace its output (as A1111)

Tokenize = Callable[[Sequence[str]], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class EmbeddingSlot:
    """Where a textual-inversion embedding's vectors go: rows `position` to `position + vectors - 1`."""

    position: int  # index in the chunk's 77 ids, start token included
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token row for the text encoder: ids, a weight per id, and the embeddings to put in it."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    token_count: int  # tokens from the prompt (embedding vectors included; start, end and padding not)
    embeddings: tuple[EmbeddingSlot, ...] = ()


class _ChunkBuilder:
    """A1111's `tokenize_line` loop: fills a chunk token by token and closes it when full or at BREAK."""

    def __init__(self, start_id: int, end_id: int, pad_id: int, comma_id: int) -> None:
        self.start_id, self.end_id, self.pad_id, self.comma_id = start_id, end_id, pad_id, comma_id
        self.chunks: list[PromptChunk] = []
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.slots: list[tuple[int, str, int]] = []  # (index in self.tokens, name, vectors)
        self.last_comma = -1

    def close_chunk(self) -> None:
        content = len(self.tokens)
        padding = CHUNK_TOKENS - content
        tokens = (self.start_id, *self.tokens, self.end_id) + (self.pad_id,) * padding
        weights = (1.0, *self.weights, 1.0) + (1.0,) * padding
        slots = tuple(EmbeddingSlot(index + 1, name, vectors) for index, name, vectors in self.slots)
        self.chunks.append(PromptChunk(tokens, weights, content, slots))
        self._reset()

    def add_token(self, token: int, weight: float) -> None:
        self._make_room(is_comma=token == self.comma_id)
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, name: str, vectors: int, weight: float) -> None:
        self._make_room(is_comma=False)
        if len(self.tokens) + vectors > CHUNK_TOKENS:
            self.close_chunk()  # an embedding's vectors are never split between chunks
        self.slots.append((len(self.tokens), name, vectors))
        self.tokens += [EMBEDDING_PLACEHOLDER_ID] * vectors
        self.weights += [weight] * vectors

    def _make_room(self, *, is_comma: bool) -> None:
        """Before adding a token: remember a comma, or move the words after the last comma on when full."""
        if is_comma:
            self.last_comma = len(self.tokens)
        elif (
            len(self.tokens) == CHUNK_TOKENS
            and self.last_comma != -1
            and len(self.tokens) - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved_tokens, moved_weights = self.tokens[cut:], self.weights[cut:]
            moved_slots = [(index - cut, name, vectors) for index, name, vectors in self.slots if index >= cut]
            del self.tokens[cut:], self.weights[cut:]
            self.slots = [slot for slot in self.slots if slot[0] < cut]
            self.close_chunk()
            self.tokens, self.weights, self.slots = moved_tokens, moved_weights, moved_slots
        if len(self.tokens) == CHUNK_TOKENS:
            self.close_chunk()


class _EmbeddingNames:
    """Finds embedding names in token ids, A1111's way: the longest name whose tokens start at a position."""

    def __init__(self, embeddings: Mapping[str, int], tokenize: Tokenize) -> None:
        self.vectors = dict(embeddings)
        spellings = [(name, text) for name in embeddings for text in (name, EMBEDDING_PREFIX + name)]
        self._by_first_id: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for (name, _), ids in zip(spellings, tokenize([text for _, text in spellings]), strict=True):
            if ids:
                self._by_first_id.setdefault(ids[0], []).append((tuple(ids), name))
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)

    def at(self, ids: Sequence[int], position: int) -> tuple[str, int] | None:
        """The embedding named at `position` and how many token ids its name takes, or None."""
        for name_ids, name in self._by_first_id.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return name, len(name_ids)
        return None


def chunk_prompt(
    runs: Sequence[tuple[str, float]],
    tokenize: Tokenize,
    *,
    pad_id: int,
    start_id: int = START_TOKEN_ID,
    end_id: int = END_TOKEN_ID,
    comma_id: int = COMMA_TOKEN_ID,
    embeddings: Mapping[str, int] | None = None,
    max_tokens: int = MAX_PROMPT_TOKENS,
) -> list[PromptChunk]:
    """Cut weighted runs (from `parse_prompt_attention`) into 77-token chunks with A1111's rules.

    `tokenize` maps texts to their token ids without start/end tokens or truncation
    (`ClipTokenizer.token_ids`). `pad_id` fills each chunk after its end token: 49407 for CLIP-L (SD 1.x,
    SDXL's first encoder), 0 for OpenCLIP (SD 2.x, SDXL's second). `embeddings` maps each textual-inversion
    embedding's name to its number of vectors: where the tokens of a name (or of `embedding:name`) appear,
    that many placeholder tokens take the run's weight and an `EmbeddingSlot` says where the vectors go.

    Raises UsageError when the prompt has more than `max_tokens` tokens or an embedding more than 75 vectors.
    """
    for name, vectors in (embeddings or {}).items():
        if vectors > CHUNK_TOKENS:
            raise UsageError(f"embedding {name!r} has {vectors} vectors; at most {CHUNK_TOKENS} fit in a prompt chunk")
    names = _EmbeddingNames(embeddings, tokenize) if embeddings else None
    builder = _ChunkBuilder(start_id, end_id, pad_id, comma_id)
    for (text, weight), ids in zip(runs, tokenize([text for text, _ in runs]), strict=True):
        if (text, weight) == BREAK:
            builder.close_chunk()
            continue
        position = 0
        while position < len(ids):
            found = names.at(ids, position) if names else None
            if found is None:
                builder.add_token(ids[position], weight)
                position += 1
            else:
                name, name_length = found
                builder.add_embedding(name, names.vectors[name], weight)
                position += name_length
    if builder.tokens or not builder.chunks:
        builder.close_chunk()

    total = sum(chunk.token_count for chunk in builder.chunks)
    if total > max_tokens:
        raise UsageError(
            f"the prompt is {total} tokens long; at most {max_tokens} are read: shorten it "
            f"(each {CHUNK_TOKENS} tokens are one more text-encoder pass)"
        )
    return builder.chunks


def chunk_tensors(
    chunks: Sequence[PromptChunk], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks as a `(k, 77)` int64 ids tensor and a `(k, 77)` float32 weights tensor."""
    import torch

    ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long, device=device)
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32, device=device)
    return ids, weights


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's embedding by its weight, then restore the mean.

    `z` is the text encoder's output `(B, 77, D)` for one chunk, `weights` its `(B, 77)` token weights. The
    mean is taken over the whole tensor, as A1111 does over the prompts it encodes together. The arithmetic
    runs in at least float32 (A1111's weights are float32, which promotes half-precision outputs); the
    result has `z`'s dtype.
    """
    import torch

    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    z32 = z.to(compute_dtype)
    original_mean = z32.mean()
    weighted = z32 * weights.to(device=z.device, dtype=compute_dtype).unsqueeze(-1)  # (B, 77, D)
    new_mean = weighted.mean()
    return (weighted * (original_mean / new_mean)).to(z.dtype)
