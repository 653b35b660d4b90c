"""The normal noise an NVIDIA GPU draws for a seed, reproduced on any device (`--rng cuda`).

AUTOMATIC1111 draws its noise with `torch.randn` on the GPU by default, where torch's CUDA generator is
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) followed by
curand's Box-Muller transform. This module computes the same numbers with int64 tensor arithmetic, so a
seed from an image made on a GPU gives the same starting noise on a CPU or a Mac (A1111's "NV" noise source
and stable-diffusion.cpp's `--rng cuda` do the same).

How torch lays out `torch.randn(n, device="cuda", generator=g)` for float32 (ATen's CUDA distribution
templates over curand's Philox state):
- the generator holds a seed, which is the Philox key (low word, high word), and an offset (0 after
  `manual_seed`) that advances by 4 for every draw a thread makes;
- T threads run, 256 per block, the grid capped at the blocks the GPU holds resident; thread t's counter
  for its i-th draw is (offset / 4 + i as a 64-bit number over words 0-1, t over words 2-3);
- a draw is four 32-bit words (x, y, z, w); with u = x 2^-32 + 2^-33 and v = y 2^-32 2π + 2^-33 2π in
  float32 it gives the normals sqrt(-2 ln u) sin v, sqrt(-2 ln u) cos v, then the same from (z, w);
- element t + T (4i + j) is the j-th normal of thread t's i-th draw.
While n fits in the grid (always when `max_threads` is None), T >= n: element k is the first normal of
thread k's only draw, and the offset advances by 4 per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments: golden ratio, sqrt(3) - 1
THREADS_PER_BLOCK = 256
NORMALS_PER_DRAW = 4
_TWO_POW_32_INV = 2.0**-32
# curand's CURAND_2POW32_INV_2PI: float32 2^-32 times float32 2*pi, exact in float32.
_TWO_POW_32_INV_2PI = 2.0**-32 * float(torch.tensor(2 * math.pi, dtype=torch.float32))


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * multiplier for 32-bit words a, in int64 without overflow."""
    low_product = a * (multiplier & 0xFFFF)  # < 2^48
    high_product = a * (multiplier >> 16)  # < 2^48, worth 2^16 times more
    low_sum = ((high_product & 0xFFFF) << 16) + low_product  # < 2^49
    return (high_product >> 16) + (low_sum >> 32), low_sum & MASK32


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Philox4x32-R: a `(4, ...)` counter and a `(2, ...)` key of 32-bit words (int64 tensors) -> `(4, ...)`."""
    c0, c1, c2, c3 = counter.unbind(0)
    k0, k1 = key.unbind(0)
    for round_index in range(rounds):
        if round_index:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3))


def box_muller(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """curand's Box-Muller on two 32-bit words: the (sin, cos) pair of float32 normals.

    u and v are formed in float32 exactly as curand forms them; the logarithm, root and sine run in float64
    and round once, which stays within a few float32 ulps of the GPU's own float32 functions.
    """
    u = x.to(torch.float32) * _TWO_POW_32_INV + _TWO_POW_32_INV / 2
    v = y.to(torch.float32) * _TWO_POW_32_INV_2PI + _TWO_POW_32_INV_2PI / 2
    radius = torch.sqrt(-2.0 * torch.log(u.double()))
    angle = v.double()
    return (radius * torch.sin(angle)).float(), (radius * torch.cos(angle)).float()


class CudaRandn:
    """`torch.randn` as a CUDA generator seeded with `seed` draws it, computed on the CPU.

    Successive `randn` calls continue the stream as successive calls on one CUDA generator do.
    `max_threads` is the GPU's resident thread count (multiprocessors x max threads per multiprocessor);
    it only matters for tensors larger than that, whose layout depends on the GPU. None (the default)
    lays every tensor out as if it fit, as A1111's "NV" source does. `offset` is where the stream starts, in
    torch's units (4 per Philox counter step), as after `set_offset`; 0 after `manual_seed`.
    """

    def __init__(self, seed: int, *, max_threads: int | None = None, offset: int = 0) -> None:
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), as torch's manual_seed takes; got {seed}")
        if max_threads is not None and max_threads < THREADS_PER_BLOCK:
            raise ValueError(f"max_threads must be at least {THREADS_PER_BLOCK}, got {max_threads}")
        if offset < 0 or offset % NORMALS_PER_DRAW:
            raise ValueError(f"offset must be a non-negative multiple of {NORMALS_PER_DRAW}, got {offset}")
        self.seed = seed & (2**64 - 1)  # torch's manual_seed reads negative seeds as two's complement
        self.offset = offset
        self.max_threads = max_threads

    def randn(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Standard normal noise of `shape`, as the CUDA generator's next `torch.randn(shape)` would give."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            # float64 goes through a different curand transform (two doubles per draw).
            raise ValueError(f"CUDA-compatible noise is drawn in float32, float16 or bfloat16, not {dtype}")
        count = math.prod(shape)
        if count == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        threads = math.ceil(count / THREADS_PER_BLOCK) * THREADS_PER_BLOCK
        if self.max_threads is not None:
            threads = min(threads, self.max_threads // THREADS_PER_BLOCK * THREADS_PER_BLOCK)
        per_round = threads * NORMALS_PER_DRAW

        index = torch.arange(count, dtype=torch.int64)
        draw, within = index // per_round, index % per_round
        slot, thread = within // threads, within % threads  # slot: which of the draw's 4 normals
        draw_counter = self.offset // NORMALS_PER_DRAW + draw
        counter = torch.stack((draw_counter & MASK32, draw_counter >> 32, thread & MASK32, thread >> 32))
        key = torch.tensor([self.seed & MASK32, self.seed >> 32], dtype=torch.int64)
        words = philox4x32(counter, key)

        first_pair = slot < 2
        x = torch.where(first_pair, words[0], words[2])
        y = torch.where(first_pair, words[1], words[3])
        sine, cosine = box_muller(x, y)
        noise = torch.where(slot % 2 == 0, sine, cosine)

        self.offset += NORMALS_PER_DRAW * math.ceil(count / per_round)
        return noise.reshape(tuple(shape)).to(device=device, dtype=dtype)


def cuda_randn(
    shape: Sequence[int],
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed))` on any device."""
    return CudaRandn(seed).randn(shape, dtype=dtype, device=device)
