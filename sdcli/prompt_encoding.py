"""Prompts encoded as AUTOMATIC1111 encodes them: emphasis, 75-token chunks, BREAK, embeddings, prompt editing.

For each text encoder of the family, a prompt is parsed (`sdcli.prompt_parser`), cut into 77-token chunks
(`sdcli.prompt_chunks`), each chunk encoded on its own, weighted ("Original" emphasis, per chunk) and the
chunks' contexts concatenated: 77 * k tokens. The pooled output (SDXL) is the first chunk's, as A1111's.

Prompt editing and alternation give a prompt several texts over the steps. As in A1111, the texts of one
prompt are encoded together: the emphasis mean spans them, and a text with fewer chunks than another gets
empty chunks (A1111's: start, then end tokens), so all of them have the same length. Different prompts
keep their own lengths: a batch whose prompts differ in length repeats each shorter prompt's last vector
(A1111's `stack_conds`), and the prompt and the negative prompt run through the UNet at their own lengths
(`sdcli.denoiser.guided_unet`).

A step's conditioning is chosen as A1111 chooses it: at step s (0-based), each prompt's first segment whose
end step is at least s. As in A1111, a step is a call of the model, and samplers that call it twice per step
schedule over twice the steps (`sdcli.pipeline.schedule_steps`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sdcli.conditioning import TextConditioning
from sdcli.errors import UsageError
from sdcli.families import TextEncoderSpec
from sdcli.prompt_chunks import CHUNK_TOKENS, PromptChunk, apply_emphasis, chunk_prompt, chunk_tensors
from sdcli.prompt_parser import BREAK, parse_prompt_attention, prompt_schedule
from sdcli.text_encoders import combine_outputs, run_text_encoder
from sdcli.tokenizer import END_TOKEN_ID, START_TOKEN_ID


def prompt_chunks(
    text: str, spec: TextEncoderSpec, tokenizer, embeddings: Mapping[str, torch.Tensor] | None = None
) -> list[PromptChunk]:
    """One prompt text (no editing syntax left) -> its 77-token chunks for the encoder of `spec`.

    `embeddings` maps textual-inversion names to this encoder's vectors (n, D).
    """
    counts = {name: len(vectors) for name, vectors in (embeddings or {}).items()}
    return chunk_prompt(parse_prompt_attention(text), tokenizer.token_ids, pad_id=spec.pad_id, embeddings=counts)


def _token_embedding(module: nn.Module, spec: TextEncoderSpec) -> nn.Embedding:
    """The encoder's token embedding table: its nn.Embedding with one row per vocabulary entry."""
    for child in module.modules():
        if isinstance(child, nn.Embedding) and child.num_embeddings == spec.config.vocab_size:
            return child
    raise ValueError("the text encoder has no token embedding table")


@contextmanager
def _embeddings_in(module: nn.Module, spec: TextEncoderSpec, rows: list[tuple[int, int, torch.Tensor]]):
    """While active, the token embedding's output has `vectors` at (row, position) for each entry of `rows`."""
    if not rows:
        yield
        return

    def put(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, position, vectors in rows:
            output[row, position : position + len(vectors)] = vectors.to(output.device, output.dtype)
        return output

    handle = _token_embedding(module, spec).register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def _encode_with(
    module: nn.Module,
    spec: TextEncoderSpec,
    chunked: list[list[PromptChunk]],
    clip_skip: int,
    embeddings: Mapping[str, torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Texts' chunks (each padded to the same count) -> (context (S, 77k, D), pooled of the first chunk)."""
    contexts, pooled = [], None
    for index in range(len(chunked[0])):
        chunks = [text_chunks[index] for text_chunks in chunked]
        ids, weights = chunk_tensors(chunks, device)
        rows = [(row, slot.position, embeddings[slot.name]) for row, c in enumerate(chunks) for slot in c.embeddings]
        with _embeddings_in(module, spec, rows):
            context, chunk_pooled = run_text_encoder(module, spec, ids, clip_skip)
        contexts.append(apply_emphasis(context, weights))
        if index == 0:
            pooled = chunk_pooled
    return torch.cat(contexts, dim=1), pooled


def encode_texts(
    model, texts: Sequence[str], clip_skip: int = 1, embeddings: Mapping[str, Sequence[torch.Tensor]] | None = None
) -> TextConditioning:
    """Texts encoded together, as A1111 encodes one prompt's schedule -> (S, 77k, D) conditioning, float32.

    `embeddings` maps names to one vector tensor per text encoder (see `sdcli.embeddings`).
    """
    outputs = []
    lengths = set()
    for i, (spec, encoder, tokenizer) in enumerate(
        zip(model.family.text_encoders, model.text_encoders, model.tokenizers, strict=True)
    ):
        vectors = {name: per_encoder[i] for name, per_encoder in (embeddings or {}).items()}
        chunked = [prompt_chunks(text, spec, tokenizer, vectors) for text in texts]
        count = max(len(c) for c in chunked)
        empty = PromptChunk((START_TOKEN_ID,) + (END_TOKEN_ID,) * (CHUNK_TOKENS + 1), (1.0,) * (CHUNK_TOKENS + 2), 0)
        chunked = [c + [empty] * (count - len(c)) for c in chunked]
        lengths.add(count)
        with model.use(encoder) as module:
            outputs.append(_encode_with(module, spec, chunked, clip_skip, vectors, model.device))
    if len(lengths) > 1:
        raise UsageError("the text encoders read this prompt in different numbers of chunks; simplify it")
    return combine_outputs(outputs)


def _stack(items: Sequence[TextConditioning]) -> TextConditioning:
    """Rows of possibly different token lengths -> one batch: shorter contexts repeat their last vector."""
    length = max(item.context.shape[1] for item in items)

    def padded(context: torch.Tensor) -> torch.Tensor:
        missing = length - context.shape[1]
        return context if missing == 0 else torch.cat([context, context[:, -1:].expand(-1, missing, -1)], dim=1)

    return TextConditioning.cat([TextConditioning(padded(item.context), item.pooled) for item in items])


@dataclass(frozen=True)
class ScheduledConditioning:
    """A batch of prompts' conditioning over the sampling steps: `batches[step_batch[s]]` holds at step s."""

    batches: tuple[TextConditioning, ...]
    step_batch: tuple[int, ...]

    def index_at(self, step: int) -> int:
        """Which of `batches` holds at `step` (0-based; steps past the schedule keep the last)."""
        return self.step_batch[min(step, len(self.step_batch) - 1)]

    def at(self, step: int) -> TextConditioning:
        return self.batches[self.index_at(step)]


def encode_schedule(
    model,
    prompts: Sequence[str],
    steps: int,
    clip_skip: int = 1,
    embeddings: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> ScheduledConditioning:
    """Prompts (one per image) -> their conditioning for each of `steps` steps, each distinct text encoded once."""
    encoded: dict[str, tuple[list[int], TextConditioning]] = {}
    for prompt in dict.fromkeys(prompts):
        schedule = prompt_schedule(prompt, steps)
        conds = encode_texts(model, [text for _, text in schedule], clip_skip, embeddings)
        encoded[prompt] = ([end for end, _ in schedule], conds)

    def segment(prompt: str, step: int) -> int:
        ends = encoded[prompt][0]
        return next((i for i, end in enumerate(ends) if step <= end), 0)  # A1111's reconstruct_cond_batch

    keys: dict[tuple[int, ...], int] = {}
    batches, step_batch = [], []
    for step in range(steps):
        key = tuple(segment(prompt, step) for prompt in prompts)
        if key not in keys:
            keys[key] = len(batches)
            rows = [
                encoded[prompt][1].chunk(len(encoded[prompt][1]))[i] for prompt, i in zip(prompts, key, strict=True)
            ]
            batches.append(_stack(rows))
        step_batch.append(keys[key])
    return ScheduledConditioning(tuple(batches), tuple(step_batch))


EXTREME_WEIGHT = 3.0  # emphasis beyond this mostly burns the image


def describe_prompt(
    prompt: str, steps: int, spec: TextEncoderSpec, tokenizer, embeddings: Mapping[str, torch.Tensor] | None = None
) -> list[str]:
    """How a prompt is read, as lines of text: each schedule segment's chunks, their tokens and weights.

    A token is shown as its BPE text, `text:weight` when its weight is not 1, an embedding as `<name>`.
    """
    lines = []
    schedule = prompt_schedule(prompt, steps)
    start = 1
    for end, text in schedule:
        if len(schedule) > 1:
            lines.append(f"steps {start}-{end}: {text}")
        start = end + 1
        chunks = prompt_chunks(text, spec, tokenizer, embeddings)
        for number, chunk in enumerate(chunks, 1):
            words = []
            slots = {slot.position: slot for slot in chunk.embeddings}
            position = 1
            while position <= chunk.token_count:
                weight = chunk.weights[position]
                if position in slots:
                    word = f"<{slots[position].name}>"
                    position += slots[position].vectors
                else:
                    word = tokenizer.token_texts([chunk.tokens[position]])[0]
                    position += 1
                words.append(word if weight == 1.0 else f"{word}:{weight:.3g}")
            lines.append(f"  chunk {number}/{len(chunks)}, {chunk.token_count} tokens: {' '.join(words)}")
    return lines


def prompt_warnings(prompt: str, missing_embeddings: Sequence[str]) -> list[str]:
    """What in a prompt is probably not what its writer meant: extreme weights, unknown `embedding:` names."""
    warnings = [f"embedding {name!r} not found: the words are read as text" for name in missing_embeddings]
    for text in dict.fromkeys(text for _, text in prompt_schedule(prompt, 100)):  # every side of every edit
        for run, weight in parse_prompt_attention(text):
            if (run, weight) != BREAK and abs(weight) > EXTREME_WEIGHT and run.strip():
                warnings.append(
                    f"{run.strip()[:40]!r} has weight {weight:.3g}: above {EXTREME_WEIGHT:g} images burn out"
                )
    return list(dict.fromkeys(warnings))
