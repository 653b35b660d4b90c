"""Text conditioning as one value: what the prompt gives the UNet, batched and guided field by field.

SD 1.x and 2.x condition the UNet on per-token embeddings only; SDXL adds a pooled text embedding. Keeping
them together in one frozen value means classifier-free guidance, batching and device moves treat every
field alike, so a new kind of conditioning is a new field here, not a special case in the sampler code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TextConditioning:
    """The text encoders' output for a batch of prompts.

    `context`: per-token embeddings (B, T, D) for the UNet's cross-attention (several encoders' contexts
    concatenated on D). `pooled`: one vector per prompt (B, P) from the encoder whose spec has `pooled`
    (SDXL: the input of the UNet's label embedding `y`, with the size embeddings appended), else None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextConditioning:
        """Apply `fn` to every tensor field (None fields stay None)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TextConditioning(**{k: None if v is None else fn(v) for k, v in values.items()})

    def to(self, *args, **kwargs) -> TextConditioning:
        """Every field moved or cast as `torch.Tensor.to(*args, **kwargs)`."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def chunk(self, n: int) -> tuple[TextConditioning, ...]:
        """Split along the batch into `n` equal parts (the inverse of `cat`)."""
        size = len(self) // n
        if size * n != len(self):
            raise ValueError(f"a batch of {len(self)} does not split into {n} equal parts")
        return tuple(self.map(lambda t, i=i: t[i * size : (i + 1) * size]) for i in range(n))

    @staticmethod
    def cat(items: Sequence[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch, field by field; a field must be present in all items or in none."""
        values = {}
        for f in fields(TextConditioning):
            parts = [getattr(item, f.name) for item in items]
            if all(p is None for p in parts):
                values[f.name] = None
            elif any(p is None for p in parts):
                raise ValueError(f"cannot concatenate conditionings where only some have {f.name!r}")
            else:
                values[f.name] = torch.cat(parts)
        return TextConditioning(**values)
