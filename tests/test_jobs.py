"""Prompt files and PNG parameters as jobs."""

import pytest
from PIL import Image

from sdcli.errors import ImageError
from sdcli.images import save_png
from sdcli.jobs import job_from_png, parse_prompt_file


def test_text_lines_are_prompts_and_comments_and_blanks_are_skipped():
    jobs, errors = parse_prompt_file("a cat\n\n# a comment\n  a dog  \n")
    assert errors == []
    assert [(j.line, j.values) for j in jobs] == [(1, {"prompt": "a cat"}), (4, {"prompt": "a dog"})]


def test_a1111_option_lines_set_fields_and_bad_ones_name_their_line():
    text = (
        '--prompt "a cat, sitting" --negative_prompt ugly --steps 30 --cfg_scale 6.5 --seed 3\n--prompt x --tiling 1\n'
    )
    jobs, errors = parse_prompt_file(text)
    assert jobs[0].values == {"prompt": "a cat, sitting", "negative": "ugly", "steps": 30, "cfg": 6.5, "seed": 3}
    assert errors[0].line == 2 and "unknown option '--tiling'" in errors[0].message


def test_jsonl_is_detected_and_each_bad_line_is_reported_with_its_number():
    text = '{"prompt": "a", "seed": 1, "cfg": 5}\n{"prompt": "b",\n{"prompt": "c", "sede": 2}\n{"seed": 3}\n'
    text += '{"prompt": "d", "steps": "20"}\n{"prompt": "e", "n": true}\n["a list"]\n{"prompt": "f", "init": "x.png"}\n'
    jobs, errors = parse_prompt_file(text)
    assert [j.values for j in jobs] == [{"prompt": "a", "seed": 1, "cfg": 5}]
    messages = {e.line: e.message for e in errors}
    assert "invalid JSON" in messages[2]
    assert "unknown field 'sede'" in messages[3]
    assert 'no "prompt"' in messages[4]
    assert "'steps' must be int" in messages[5] and "'n' must be int" in messages[6]
    assert "is an object" in messages[7]
    assert "unknown field 'init'" in messages[8]  # image fields only for img2img and inpaint


def test_image_fields_are_accepted_for_img2img_and_inpaint():
    jobs, errors = parse_prompt_file(
        '{"prompt": "p", "init": "a.png", "mask": "m.png", "strength": 0.5}', image_fields=True
    )
    assert errors == [] and jobs[0].values["strength"] == 0.5


def test_job_from_our_png_has_every_setting(tmp_path):
    text = "a cat\nNegative prompt: dog\nSteps: 12, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 77, Size: 64x96, "
    text += "Model hash: abcdef0123, Model: tiny, Clip skip: 2, Version: sdcli 0.1.0"
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)
    png = job_from_png(path)
    assert png.job.values == {
        "prompt": "a cat", "negative": "dog", "steps": 12, "cfg": 6.5, "seed": 77, "width": 64, "height": 96,
        "clip_skip": 2, "sampler": "DPM++ 2M Karras",
    }  # fmt: skip
    assert (png.model_name, png.model_hash) == ("tiny", "abcdef0123")


def test_job_from_a1111_png_joins_sampler_and_schedule_type(tmp_path):
    # The layout A1111 1.9+ writes (sampler and schedule apart).
    text = "castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    text += "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    png = job_from_png(save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", text))
    assert png.job.values["sampler"] == "DPM++ 2M Karras" and png.model_name == "v1-5-pruned-emaonly"


def test_png_without_parameters_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ImageError, match="no generation parameters"):
        job_from_png(path)
