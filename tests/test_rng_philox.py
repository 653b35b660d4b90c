"""Tests for sdcli.rng_philox: Philox4x32-10 and the normal noise torch's CUDA generator draws.

References:
- Random123's known-answer vectors, DEShawResearch/random123 `tests/kat_vectors` (lines "philox4x32 7" and
  "philox4x32 10": counter words, key words, expected words, all hex);
- the expected output in the docstring of A1111's modules/rng_philox.py (its CPU copy of torch's CUDA
  randn): `Generator(seed=0).randn(shape=(3, 4))`;
- torch.randn on a CUDA device, when one is present (skipped otherwise);
- derivations from the layout in sdcli/rng_philox.py's docstring, written beside the tests.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from sdcli.rng_philox import MASK32, CudaRandn, _mulhilo, box_muller, cuda_randn, philox4x32


def words(*hex_words: str) -> torch.Tensor:
    return torch.tensor([int(word, 16) for word in hex_words], dtype=torch.int64)


KAT_VECTORS = [
    # (rounds, counter, key, expected) from random123 tests/kat_vectors.
    (7, ("00000000",) * 4, ("00000000",) * 2, ("5f6fb709", "0d893f64", "4f121f81", "4f730a48")),
    (7, ("ffffffff",) * 4, ("ffffffff",) * 2, ("5207ddc2", "45165e59", "4d8ee751", "8c52f662")),
    (
        7,
        ("243f6a88", "85a308d3", "13198a2e", "03707344"),
        ("a4093822", "299f31d0"),
        ("4dfccaba", "190a87f0", "c47362ba", "b6b5242a"),
    ),
    (10, ("00000000",) * 4, ("00000000",) * 2, ("6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8")),
    (10, ("ffffffff",) * 4, ("ffffffff",) * 2, ("408f276d", "41c83b0e", "a20bc7c6", "6d5451fd")),
    (
        10,
        ("243f6a88", "85a308d3", "13198a2e", "03707344"),
        ("a4093822", "299f31d0"),
        ("d16cfe09", "94fdcceb", "5001e420", "24126ea1"),
    ),
]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT_VECTORS)
def test_philox4x32_matches_random123_known_answers(rounds, counter, key, expected):
    assert philox4x32(words(*counter), words(*key), rounds=rounds).tolist() == words(*expected).tolist()


def test_philox4x32_computes_many_counters_at_once():
    # The three 10-round vectors side by side: columns of a (4, 3) counter and a (2, 3) key.
    cases = [case for case in KAT_VECTORS if case[0] == 10]
    counter = torch.stack([words(*case[1]) for case in cases], dim=1)
    key = torch.stack([words(*case[2]) for case in cases], dim=1)
    expected = torch.stack([words(*case[3]) for case in cases], dim=1)
    assert philox4x32(counter, key).tolist() == expected.tolist()


def test_mulhilo_equals_exact_integer_product():
    rng = random.Random(0)
    values = [0, 1, MASK32, *(rng.randrange(2**32) for _ in range(200))]
    for multiplier in (0xD2511F53, 0xCD9E8D57):
        hi, lo = _mulhilo(torch.tensor(values, dtype=torch.int64), multiplier)
        assert hi.tolist() == [(value * multiplier) >> 32 for value in values]
        assert lo.tolist() == [(value * multiplier) & MASK32 for value in values]


def test_box_muller_follows_curands_formula():
    # curand: u = x * 2^-32 + 2^-33 and v = y * (2^-32 * 2pi_f32) + half that, in float32;
    # normals sqrt(-2 ln u) * (sin v, cos v). 0xffffffff rounds to 2^32 in float32, so u = 1 and both are 0.
    x = torch.tensor([0, 1, 2**31, 123456789, MASK32], dtype=torch.int64)
    y = torch.tensor([0, 3, 2**30, 987654321, 7], dtype=torch.int64)
    two_pi_f32 = torch.tensor(2 * math.pi, dtype=torch.float32).item()
    u = x.float() * 2.0**-32 + 2.0**-33
    v = y.float() * (2.0**-32 * two_pi_f32) + 2.0**-33 * two_pi_f32
    radius = (-2 * u.double().log()).sqrt()
    sine, cosine = box_muller(x, y)
    torch.testing.assert_close(sine, (radius * v.double().sin()).float(), rtol=0, atol=0)
    torch.testing.assert_close(cosine, (radius * v.double().cos()).float(), rtol=0, atol=0)
    assert sine[-1].item() == 0.0 and cosine[-1].item() == 0.0


def test_seed_0_matches_a1111s_documented_gpu_noise():
    # A1111 modules/rng_philox.py docstring, "Expected output" of Generator(seed=0).randn(shape=(3, 4)).
    expected = torch.tensor(
        [
            [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
        ]
    )
    torch.testing.assert_close(cuda_randn((3, 4), 0), expected, rtol=0, atol=1e-6)


def _element(seed: int, counter_low: int, thread: int, slot: int) -> float:
    """One normal by the layout rule: normal `slot` of the draw at counter (counter_low, 0, thread, 0)."""
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64)
    x = philox4x32(torch.tensor([counter_low, 0, thread, 0], dtype=torch.int64), key)
    sine, cosine = box_muller(x[2 * (slot // 2)], x[2 * (slot // 2) + 1])
    return (sine if slot % 2 == 0 else cosine).item()


def test_each_element_is_the_first_normal_of_its_own_thread_and_calls_advance_the_counter():
    seed = 1234
    generator = CudaRandn(seed)
    first = generator.randn((2, 5))
    assert generator.offset == 4
    second = generator.randn((7,))
    assert generator.offset == 8
    # First call: element k is thread k's first draw at counter word 0 = offset / 4 = 0; second call at 1.
    assert first.flatten().tolist() == [_element(seed, 0, k, 0) for k in range(10)]
    assert second.tolist() == [_element(seed, 1, k, 0) for k in range(7)]


def test_tensors_larger_than_the_gpu_grid_use_all_four_normals_and_several_draws():
    # 2000 values on a GPU of 256 resident threads: T = 256, 1024 values per round of draws.
    # Element 700: round 0, 700 = 2 * 256 + 188: thread 188, normal 2 (sin of words z, w).
    # Element 1500: round 1, 1500 - 1024 = 476 = 1 * 256 + 220: thread 220, normal 1, counter word 0 = 1.
    generator = CudaRandn(99, max_threads=256)
    noise = generator.randn((2000,))
    assert noise[700].item() == _element(99, 0, 188, 2)
    assert noise[1500].item() == _element(99, 1, 220, 1)
    assert noise[255].item() == _element(99, 0, 255, 0)
    # Two rounds of draws: the offset advances by 4 per draw.
    assert generator.offset == 8


def test_without_a_thread_limit_every_element_has_its_own_thread():
    noise = CudaRandn(5).randn((3000,))
    assert noise[2999].item() == _element(5, 0, 2999, 0)


def test_seed_words_and_torchs_range_of_seeds():
    # A 64-bit seed is the key (low word, high word); -1 is 2^64 - 1 as in torch.Generator.manual_seed.
    assert cuda_randn((4,), 2**40 + 5).tolist() == [_element(2**40 + 5, 0, k, 0) for k in range(4)]
    assert cuda_randn((4,), -1).tolist() == cuda_randn((4,), 2**64 - 1).tolist()
    with pytest.raises(ValueError, match="seed must be"):
        CudaRandn(2**64)


def test_half_precision_output_and_float64_refused():
    assert cuda_randn((2, 3), 0, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="float32"):
        cuda_randn((2,), 0, dtype=torch.float64)


def test_empty_shape_draws_nothing():
    generator = CudaRandn(0)
    assert generator.randn((0, 4)).shape == (0, 4)
    assert generator.offset == 0


def test_noise_is_standard_normal():
    noise = cuda_randn((4, 128, 128), 42)
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 1) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_torch_randn_on_a_cuda_device():
    # Tolerance: the GPU computes log/sin in float32 with fast intrinsics; a wrong layout or counter is off by
    # order 1, not 1e-5.
    properties = torch.cuda.get_device_properties(0)
    max_threads = properties.multi_processor_count * properties.max_threads_per_multi_processor
    for seed in (0, 1, 123456789, 2**40 + 7):
        cuda = torch.Generator("cuda").manual_seed(seed)
        ours = CudaRandn(seed, max_threads=max_threads)
        for shape in [(3, 4), (1, 4, 64, 64), (2, 4, 128, 128), (3 * max_threads + 17,)]:
            expected = torch.randn(shape, generator=cuda, device="cuda").cpu()
            torch.testing.assert_close(ours.randn(shape), expected, rtol=1e-5, atol=3e-5)


def test_a_stream_started_at_an_offset_continues_as_one_that_drew_up_to_it():
    # torch's CUDA generator: offset 4 n is where n draws of a tensor that fits the grid leave it.
    drawn = CudaRandn(8)
    drawn.randn((5,))
    assert CudaRandn(8, offset=4).randn((5,)).tolist() == drawn.randn((5,)).tolist()
    assert CudaRandn(8, offset=4 << 32).randn((3,)).tolist() == [_element_high(8, 1, k) for k in range(3)]
    with pytest.raises(ValueError, match="multiple of 4"):
        CudaRandn(8, offset=2)


def _element_high(seed: int, counter_high: int, thread: int) -> float:
    """The first normal of the draw at counter (0, counter_high, thread, 0)."""
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64)
    x = philox4x32(torch.tensor([0, counter_high, thread, 0], dtype=torch.int64), key)
    return box_muller(x[0], x[1])[0].item()
