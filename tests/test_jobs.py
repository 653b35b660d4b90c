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
        "clip_skip": 2, "sampler": "DPM++ 2M Karras", "rng": "cpu",
    }  # fmt: skip
    assert (png.model_name, png.model_hash) == ("tiny", "abcdef0123")


def test_job_from_a1111_png_reads_sampler_and_schedule_type(tmp_path):
    # The layout A1111 1.9+ writes (sampler and schedule apart).
    text = "castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    text += "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    png = job_from_png(save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", text))
    assert (png.job.values["sampler"], png.job.values["schedule"]) == ("DPM++ 2M", "karras")
    assert png.model_name == "v1-5-pruned-emaonly"


def test_png_without_parameters_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ImageError, match="no generation parameters"):
        job_from_png(path)


def test_a_byte_order_mark_does_not_become_part_of_the_first_prompt():
    jobs, errors = parse_prompt_file("\ufeffa cat\na dog\n")
    assert errors == [] and jobs[0].values == {"prompt": "a cat"}
    jobs, errors = parse_prompt_file('\ufeff{"prompt": "a cat"}\n')
    assert errors == [] and jobs[0].values == {"prompt": "a cat"}


def test_options_after_a_plain_prompt_are_an_error_naming_the_option():
    jobs, errors = parse_prompt_file("a blue bird --bogus 3\na red bird --steps 30\n")
    assert jobs == []
    assert "unknown option '--bogus'" in errors[0].message
    assert '--prompt "..." --steps VALUE' in errors[1].message


@pytest.mark.parametrize("prompt", ["a cat -- digital art", "a--b", "a cat --- sketch", "ratio 1--2", "x - -y"])
def test_dashes_that_are_not_options_stay_in_the_prompt(prompt):
    jobs, errors = parse_prompt_file(prompt + "\n")
    assert errors == [] and jobs[0].values == {"prompt": prompt}


def test_a_seed_of_minus_one_is_read_as_is_from_every_source(tmp_path):
    jobs, _ = parse_prompt_file('{"prompt": "a", "seed": -1}\n')
    assert jobs[0].values["seed"] == -1
    jobs, _ = parse_prompt_file('--prompt "a" --seed -1\n')
    assert jobs[0].values["seed"] == -1
    text = "a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: -1, Size: 64x64, Model: tiny"
    assert job_from_png(save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)).job.values["seed"] == -1


@pytest.mark.parametrize(
    ("model", "plain"),
    [("tiny", "tiny"), ("/etc/x.safetensors", "x.safetensors"), ("../../x", "x"), ("C:\\m\\y", "y"), ("..", None)],
)
def test_a_pngs_model_is_reduced_to_a_plain_name(tmp_path, model, plain):
    text = f"a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: {model}"
    assert job_from_png(save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)).model_name == plain


def test_a_folder_given_as_the_png_says_so(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        job_from_png(tmp_path)


def test_a_line_sets_the_rng_in_either_syntax():
    jobs, errors = parse_prompt_file('--prompt "a cat" --rng cuda\n')
    assert errors == [] and jobs[0].values == {"prompt": "a cat", "rng": "cuda"}
    jobs, errors = parse_prompt_file('{"prompt": "a cat", "rng": "cuda"}\n{"prompt": "b", "rng": 1}\n')
    assert jobs[0].values == {"prompt": "a cat", "rng": "cuda"}
    assert errors[0].line == 2 and "'rng' must be str" in errors[0].message


@pytest.mark.parametrize(
    ("rng", "expected"),
    [("RNG: GPU, ", "cuda"), ("RNG: NV, ", "cuda"), ("RNG: CPU, ", "cpu"), ("", "cuda"), ("RNG: XPU, ", "XPU")],
)
def test_a1111s_rng_values_as_its_parse_generation_parameters_reads_them(tmp_path, rng, expected):
    # A1111 writes RNG only when it is not its default, GPU, and reads a missing one as GPU. A value it never
    # writes is kept as is, for the request's check to refuse unless --rng replaces it.
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", f"a cat\nSteps: 20, Seed: 1, {rng}Version: v1.9.4")
    assert job_from_png(path).job.values["rng"] == expected
