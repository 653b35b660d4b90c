"""sdcli.infotext: A1111's parameters text, written and read as A1111 does, and through a PNG chunk."""

from __future__ import annotations

import pytest
from PIL import Image

from sdcli.images import read_png_parameters, save_png
from sdcli.infotext import format_infotext, parse_infotext

EXAMPLE_PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M Karras",
    "CFG scale": 7.5,
    "Seed": 42,
    "Size": "512x512",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Version": "sdcli 0.1.0",
}


def test_format_infotext_layout():
    text = format_infotext("a cat", "blurry, dog", EXAMPLE_PARAMS)
    assert text == (
        "a cat\n"
        "Negative prompt: blurry, dog\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Version: sdcli 0.1.0"
    )


def test_format_infotext_omits_empty_negative_and_none_values():
    text = format_infotext("a cat", "", {"Steps": 20, "Hires upscale": None, "Seed": 1, "Size": "8x8"})
    assert text == "a cat\nSteps: 20, Seed: 1, Size: 8x8"


def test_format_infotext_quotes_like_a1111():
    # A1111's quote(): json.dumps(value, ensure_ascii=False) when the value contains ',', '\n' or ':';
    # otherwise written as is, even with a quote inside.
    text = format_infotext("p", "", {"Lora hashes": "detail: e3f9, add: 1a2b", "Note": 'say "hi"', "Ünï": "ü"})
    assert text.split("\n")[-1] == 'Lora hashes: "detail: e3f9, add: 1a2b", Note: say "hi", Ünï: ü'


def test_format_infotext_rejects_keys_a1111_cannot_read():
    for key in ("A", "Steps:", " Steps", "Bad,key"):
        with pytest.raises(ValueError, match="key"):
            format_infotext("p", "", {key: 1, "Seed": 1, "Steps": 2})


TRICKY_VALUES = [
    "a, b",
    "key: value",
    'say "hi", then "bye"',
    '"starts quoted"',
    "ends with backslash \\",
    'quote and colon ": x',
    "two\nlines",
    "  padded  ",
    "猫, 🐱: ünïcödé",
    "",
    '[{"type":"lora","weight":0.6}]',
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_infotext_round_trips_tricky_values(value):
    params = {"Steps": "20", "Tricky": value, "Seed": "42", "Size": "512x512"}
    assert parse_infotext(format_infotext("a cat", "a dog", params)) == ("a cat", "a dog", params)


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat", ""),
        ("a cat,\nsitting: on a mat\n\nthird line", "blurry,\nugly"),
        ("猫が桜の下に座っている, 🐱 ünïcödé", "ぼやけた"),
        ("prompt: with colons, and commas, Steps: 3", "Negative: not a param, Seed: 9"),
    ],
)
def test_infotext_round_trips_prompts(prompt, negative):
    params = {"Steps": "20", "Sampler": "Euler a", "Seed": "1"}
    assert parse_infotext(format_infotext(prompt, negative, params)) == (prompt, negative, params)


def test_parse_infotext_without_parameters_line_is_all_prompt():
    # Fewer than three "key: value" matches on the last line: A1111 keeps it in the prompt.
    assert parse_infotext("a cat\nstyle: watercolor") == ("a cat\nstyle: watercolor", "", {})
    assert parse_infotext("a cat\nNegative prompt: dog") == ("a cat", "dog", {})


def test_parse_infotext_a1111_docstring_sample():
    # Verbatim from the docstring of parse_generation_parameters in AUTOMATIC1111/stable-diffusion-webui,
    # modules/infotext_utils.py (https://github.com/AUTOMATIC1111/stable-diffusion-webui).
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
        "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt.startswith("girl with an artist's beret,") and prompt.endswith("detailed, intricate")
    assert negative.startswith("ugly, fat,") and negative.endswith("messy drawing")
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_parse_infotext_real_a1111_output_with_a_quoted_value():
    # Verbatim A1111 v1.2.1 output (ControlNet extension value quoted by A1111's quote()), from the README of
    # https://github.com/diggedypomme/KindleTimeMachine ("bees").
    text = (
        "bees\n"
        "Negative prompt: blurry\n"
        "Steps: 50, Sampler: Euler a, CFG scale: 7.5, Size: 600x800, Model hash: 6ce0161689, "
        'Model: v1.5pruned_v1-5-pruned-emaonly, Version: v1.2.1, ControlNet 1: "preprocessor: scribble_pidinet, '
        "model: control_scribble-fp16 [c508311e], weight: 1, starting/ending: (0, 1), resize mode: Crop and "
        'Resize, pixel perfect: True, control mode: Balanced, preprocessor params: (512, 64, 64)"'
    )
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("bees", "blurry")
    assert params == {
        "Steps": "50",
        "Sampler": "Euler a",
        "CFG scale": "7.5",
        "Size": "600x800",
        "Model hash": "6ce0161689",
        "Model": "v1.5pruned_v1-5-pruned-emaonly",
        "Version": "v1.2.1",
        "ControlNet 1": "preprocessor: scribble_pidinet, model: control_scribble-fp16 [c508311e], weight: 1, "
        "starting/ending: (0, 1), resize mode: Crop and Resize, pixel perfect: True, control mode: Balanced, "
        "preprocessor params: (512, 64, 64)",
    }


def test_parse_infotext_negative_prompt_spans_lines_until_the_parameters():
    text = "a\nb\nNegative prompt: c\nd\nSteps: 1, Seed: 2, Size: 8x8"
    assert parse_infotext(text) == ("a\nb", "c\nd", {"Steps": "1", "Seed": "2", "Size": "8x8"})


def test_infotext_survives_a_png_round_trip(tmp_path):
    text = format_infotext("猫, a cat:\nsecond line", "blurry", {**EXAMPLE_PARAMS, "Lora hashes": "x: 1, y: 2"})
    written = save_png(Image.effect_noise((8, 8), 64).convert("RGB"), tmp_path / "info.png", text)
    prompt, negative, params = parse_infotext(read_png_parameters(written) or "")
    assert prompt == "猫, a cat:\nsecond line" and negative == "blurry"
    assert params["Lora hashes"] == "x: 1, y: 2" and params["CFG scale"] == "7.5"
