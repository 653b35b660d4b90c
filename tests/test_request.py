"""sdcli.request: one set of defaults read by every entry point, and one validation of what a request asks."""

import inspect
import math
from dataclasses import replace

import pytest
from conftest import TINY_SD1

from sdcli.errors import UsageError
from sdcli.request import DEFAULTS, MAX_PIXELS, GenerationRequest, is_random_seed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 0, "width must be a multiple of 8"),
        ("height", 0, "height must be a multiple of 8"),
        ("width", 63, "width must be a multiple of 8"),
        ("cfg", math.nan, "cfg must be a number between 0 and 100"),
        ("cfg", math.inf, "cfg must be a number"),
        ("cfg", 1e30, "cfg must be a number"),
        ("cfg", -1.0, "cfg must be a number"),
        ("strength", math.nan, "strength must be between 0 and 1"),
        ("mask_blur", 100_000, "mask blur must be between 0 and 256"),
        ("seed", -1, "seed must be between 0"),  # -1 is resolved to a random seed before a request is made
        ("steps", 0, "steps must be between 1 and 1000"),
        ("clip_skip", 0, "clip skip must be 1 or more"),
    ],
)
def test_validate_refuses_what_would_fail_or_make_a_black_image(field, value, message):
    with pytest.raises(UsageError, match=message):
        replace(GenerationRequest("x"), **{field: value}).validate()


def test_validate_refuses_sizes_above_the_pixel_cap_before_any_work_and_names_the_helpful_options():
    side = int(MAX_PIXELS**0.5)
    GenerationRequest("x", width=side, height=side).validate()
    with pytest.raises(UsageError, match="megapixels.*--vae-tiling.*--low-memory"):
        GenerationRequest("x", width=100_000, height=100_000).validate()
    with pytest.raises(UsageError):
        GenerationRequest("x", width=side + 8, height=side).validate()


def test_validate_checks_clip_skip_against_the_models_text_encoder_depth():
    layers = TINY_SD1.max_clip_skip
    GenerationRequest("x", clip_skip=layers).validate(TINY_SD1)
    GenerationRequest("x", clip_skip=99).validate()  # without a model there is nothing to compare with
    with pytest.raises(UsageError, match=f"at most {layers}"):
        GenerationRequest("x", clip_skip=layers + 1).validate(TINY_SD1)


def test_the_request_dataclass_and_every_generating_command_read_the_shared_defaults():
    from sdcli.cli import img2img, inpaint, txt2img

    request = GenerationRequest("x")
    assert (request.steps, request.cfg, request.sampler, request.clip_skip) == (
        DEFAULTS.steps, DEFAULTS.cfg, DEFAULTS.sampler, DEFAULTS.clip_skip,
    )  # fmt: skip
    for command in (txt2img, img2img, inpaint):
        params = inspect.signature(command).parameters
        for name in ("steps", "cfg", "sampler", "clip_skip", "n", "batch_size", "max_images"):
            assert params[name].default == getattr(DEFAULTS, name), (command.__name__, name)
    assert inspect.signature(img2img).parameters["strength"].default == DEFAULTS.strength("img2img") == 0.75
    assert inspect.signature(inpaint).parameters["strength"].default == DEFAULTS.strength("inpaint") == 1.0
    assert inspect.signature(inpaint).parameters["mask_blur"].default == DEFAULTS.mask_blur


def test_minus_one_and_none_ask_for_a_random_seed():
    assert is_random_seed(None) and is_random_seed(-1)
    assert not is_random_seed(0) and not is_random_seed(7)


def test_request_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, sdcli.request, sdcli.infotext; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
