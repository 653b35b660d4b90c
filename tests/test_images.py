"""sdcli.images: tensor <-> PIL parity with diffusers, image/mask loading, resizing, atomic PNG writing."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdcli.errors import ImageError, SdcliError
from sdcli.images import (
    from_pil,
    load_image,
    load_mask,
    read_png_parameters,
    resize_to,
    save_png,
    size_multiple_of_8,
    to_pil,
)


def _random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Tensors <-> PIL


def _exact_ties() -> tuple[torch.Tensor, torch.Tensor]:
    """float32 inputs x whose scaled value (x * 0.5 + 0.5) * 255 is exactly k + 0.5, and their k."""
    levels = torch.arange(255, dtype=torch.float32)
    candidate = 2 * (levels + 0.5) / 255 - 1
    found_x, found_k = [], []
    for _ in range(8):  # walk a few ulps up from the nearest float32 until the product lands on the tie
        hit = (candidate * 0.5 + 0.5) * 255 == levels + 0.5
        found_x.append(candidate[hit])
        found_k.append(levels[hit])
        candidate = torch.nextafter(candidate, torch.tensor(2.0))
    return torch.cat(found_x), torch.cat(found_k)


def test_to_pil_rounds_half_to_even_like_numpy():
    ties, levels = _exact_ties()
    assert len(ties) > 50
    x = ties.reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = torch.from_numpy(np.asarray(to_pil(x)[0])[0, :, 0].astype(np.float32))
    # numpy's round (used by diffusers) sends k + 0.5 to the even neighbour; truncation or half-up would not.
    assert torch.equal(out, levels + levels % 2)


def test_to_pil_matches_diffusers_postprocess_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, 40, generator=generator) * 1.5  # many values outside [-1, 1]
    ties, _ = _exact_ties()
    x.view(-1)[: len(ties)] = ties  # values exactly half-way between two levels
    x[1, 1, 0, :4] = torch.tensor([-1.0, 1.0, float("inf"), float("-inf")])

    ours = to_pil(x)
    reference = VaeImageProcessor().postprocess(x, output_type="pil")

    assert len(ours) == len(reference) == 2
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.mode == theirs.mode == "RGB"
        assert mine.size == theirs.size == (40, 24)
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_pil_computes_in_float32_whatever_the_input_dtype(dtype):
    x = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.2).to(dtype)
    expected = VaeImageProcessor().postprocess(x.float(), output_type="pil")[0]
    assert np.array_equal(np.asarray(to_pil(x)[0]), np.asarray(expected))


def test_to_pil_turns_nan_black():
    x = torch.full((1, 3, 2, 2), float("nan"))
    assert np.asarray(to_pil(x)[0]).max() == 0


def test_from_pil_matches_diffusers_preprocess():
    image = _random_image(64, 48)
    ours = from_pil(image)
    reference = VaeImageProcessor().preprocess(image)  # 64x48 is already a multiple of 8: no resize
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 48, 64)
    assert torch.equal(ours, reference)


def test_from_pil_then_to_pil_gives_the_same_pixels():
    image = _random_image(16, 8, seed=3)
    assert np.array_equal(np.asarray(to_pil(from_pil(image))[0]), np.asarray(image))


def test_images_module_imports_without_torch():
    code = "import sys, sdcli.images; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------
# Loading


def test_load_image_applies_exif_orientation(tmp_path):
    # Stored 40 wide x 20 tall: left half red, right half blue. EXIF orientation 6 means "rotate 90 degrees
    # clockwise to display", so the viewer shows 20 x 40 with the red (formerly left) half on top.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), box=(0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    loaded = load_image(path)

    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_composites_transparency_on_white(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    path = tmp_path / "cutout.png"
    image.save(path)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in loaded.getpixel((2, 0)))


def test_load_image_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = load_image(path)

    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (200, 100, 50)


def test_load_image_scales_16_bit_greyscale(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(path)
    assert _pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_load_mask_with_alpha_uses_the_alpha_channel(tmp_path):
    # Black paint everywhere: luminance would say "keep", the alpha says "repaint the left column".
    mask = Image.new("RGBA", (3, 2), (0, 0, 0, 0))
    mask.putpixel((0, 0), (0, 0, 0, 255))
    mask.putpixel((0, 1), (0, 0, 0, 255))
    path = tmp_path / "mask.png"
    mask.save(path)

    loaded = load_mask(path)

    assert loaded.mode == "L"
    assert np.array_equal(np.asarray(loaded), [[255, 0, 0], [255, 0, 0]])


def test_load_mask_with_opaque_alpha_uses_luminance(tmp_path):
    # As A1111's create_binary_mask: an all-opaque alpha channel says nothing, so the paint decides.
    mask = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    mask.putpixel((1, 0), (255, 255, 255, 255))
    path = tmp_path / "opaque.png"
    mask.save(path)
    assert np.array_equal(np.asarray(load_mask(path)), [[0, 255]])


def test_load_mask_greyscale_white_means_repaint(tmp_path):
    path = tmp_path / "mask.jpg"
    mask = Image.new("RGB", (16, 16), (0, 0, 0))
    mask.paste((255, 255, 255), box=(8, 0, 16, 16))
    mask.save(path, quality=100)

    loaded = load_mask(path)

    assert loaded.mode == "L" and loaded.getpixel((2, 8)) < 10 and loaded.getpixel((13, 8)) > 245


@pytest.mark.parametrize("loader", [load_image, load_mask, read_png_parameters])
def test_non_image_file_raises_image_error_naming_the_file(tmp_path, loader):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    with pytest.raises(ImageError) as caught:
        loader(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("loader", [load_image, load_mask, read_png_parameters])
def test_missing_file_raises_image_error(tmp_path, loader):
    path = tmp_path / "absent.png"
    with pytest.raises(ImageError, match="not found") as caught:
        loader(path)
    assert str(path) in str(caught.value)


def test_truncated_image_raises_image_error(tmp_path):
    buffer = io.BytesIO()
    _random_image(64, 64).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(path)


def test_directory_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Resizing


@pytest.mark.parametrize("mode", ["crop", "fit", "stretch"])
@pytest.mark.parametrize("source", [(100, 50), (50, 100), (64, 64), (33, 77)])
@pytest.mark.parametrize("target", [(64, 64), (96, 48), (40, 72)])
def test_resize_to_gives_the_requested_size(mode, source, target):
    for image_mode in ("RGB", "L"):
        resized = resize_to(_random_image(*source, mode=image_mode), *target, mode=mode)
        assert resized.size == target and resized.mode == image_mode


@pytest.mark.parametrize("source", [(100, 50), (50, 100), (64, 64), (33, 77)])
def test_resize_to_crop_matches_diffusers_crop(source):
    image = _random_image(*source, seed=5)
    expected = VaeImageProcessor().resize(image, height=48, width=96, resize_mode="crop")
    assert np.array_equal(np.asarray(resize_to(image, 96, 48, "crop")), np.asarray(expected))


@pytest.mark.parametrize(("source", "target"), [((64, 32), (64, 64)), ((32, 64), (64, 64)), ((40, 40), (80, 48))])
def test_resize_to_fit_matches_diffusers_fill_when_the_bands_are_even(source, target):
    # diffusers copies A1111's "Resize and fill"; with an even remainder both bands have the same size and the
    # results must agree pixel for pixel.
    image = _random_image(*source, seed=6)
    expected = VaeImageProcessor().resize(image, height=target[1], width=target[0], resize_mode="fill")
    assert np.array_equal(np.asarray(resize_to(image, *target, "fit")), np.asarray(expected))


@pytest.mark.parametrize(("source", "target"), [((64, 32), (64, 65)), ((32, 64), (65, 64)), ((64, 31), (64, 64))])
def test_resize_to_fit_fills_odd_remainders_without_a_black_line(source, target):
    # With an odd target side and an even scaled side, A1111 (and diffusers, its copy) sizes the far band like
    # the near one and leaves one black row or column; a flat image must stay flat here.
    image = Image.new("RGB", source, (200, 100, 50))
    pixels = _pixels(resize_to(image, *target, "fit"))
    assert np.abs(pixels - [200, 100, 50]).max() <= 1


def test_a1111_fill_leaves_a_black_line_that_fit_avoids():
    # Shows the quirk the test above guards against is real in the reference.
    image = Image.new("RGB", (64, 32), (200, 100, 50))
    reference = _pixels(VaeImageProcessor().resize(image, height=65, width=64, resize_mode="fill"))
    assert reference[64].max() == 0
    assert _pixels(resize_to(image, 64, 65, "fit"))[64].min() > 0


def test_resize_to_rejects_unknown_mode():
    with pytest.raises(ValueError, match="resize mode"):
        resize_to(_random_image(8, 8), 8, 8, "zoom")  # type: ignore[arg-type]


def test_size_multiple_of_8_rounds_down():
    assert size_multiple_of_8(512, 768) == (512, 768)
    assert size_multiple_of_8(515, 771) == (512, 768)
    assert size_multiple_of_8(7, 8) == (0, 8)


# ---------------------------------------------------------------------------------------------------------
# Writing PNGs


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_png_writes_the_parameters_chunk(tmp_path):
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7"
    written = save_png(_random_image(8, 8), tmp_path / "cat.png", text)
    assert written == tmp_path / "cat.png"
    assert read_png_parameters(written) == text
    with Image.open(written) as image:
        assert image.text["parameters"] == text
    assert b"tEXtparameters\x00" in written.read_bytes()


def test_save_png_keeps_non_latin1_prompts_in_an_itxt_chunk(tmp_path):
    text = "猫、桜の下で — ünïcödé 🐱\nSteps: 20, Sampler: Euler, Seed: 1"
    written = save_png(_random_image(8, 8), tmp_path / "neko.png", text)
    assert b"iTXtparameters\x00" in written.read_bytes()
    assert read_png_parameters(written) == text


def test_save_png_without_parameters_has_no_chunk(tmp_path):
    written = save_png(_random_image(8, 8), tmp_path / "plain.png", None)
    assert read_png_parameters(written) is None


def test_save_png_is_deterministic_and_overwrite_replaces(tmp_path):
    image, target = _random_image(32, 16, seed=7), tmp_path / "same.png"
    first = save_png(image, target, "Steps: 1, Seed: 2, Size: 32x16").read_bytes()
    second = save_png(image, target, "Steps: 1, Seed: 2, Size: 32x16", overwrite=True)
    assert second == target
    assert second.read_bytes() == first
    assert _files(tmp_path) == ["same.png"]


def test_save_png_never_replaces_without_overwrite(tmp_path):
    target = tmp_path / "out.png"
    paths = [save_png(_random_image(8, 8, seed=i), target, f"Steps: {i}, Seed: 1, Size: 8x8") for i in range(3)]
    assert paths == [tmp_path / "out.png", tmp_path / "out-1.png", tmp_path / "out-2.png"]
    assert [read_png_parameters(p) for p in paths] == [f"Steps: {i}, Seed: 1, Size: 8x8" for i in range(3)]
    assert _files(tmp_path) == ["out-1.png", "out-2.png", "out.png"]


def test_save_png_creates_missing_directories(tmp_path):
    written = save_png(_random_image(4, 4), tmp_path / "a" / "b" / "c.png", None)
    assert written.is_file()


def test_concurrent_saves_to_the_same_name_both_survive(tmp_path):
    for round_number in range(20):
        target = tmp_path / f"race{round_number}.png"
        images = [_random_image(16, 16, seed=2 * round_number + i) for i in range(2)]
        barrier = threading.Barrier(2)
        results: list[Path | None] = [None, None]

        def save(index: int, images=images, target=target, barrier=barrier, results=results) -> None:
            barrier.wait()
            results[index] = save_png(images[index], target, f"Seed: {index}, Steps: 1, Size: 16x16")

        threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert set(results) == {target, target.with_name(f"race{round_number}-1.png")}
        for index, path in enumerate(results):
            with Image.open(path) as written:
                assert np.array_equal(np.asarray(written), np.asarray(images[index]))
    assert not [name for name in _files(tmp_path) if name.endswith(".tmp")]


def test_no_temporary_file_remains_after_success(tmp_path):
    save_png(_random_image(8, 8), tmp_path / "ok.png", "x")
    save_png(_random_image(8, 8), tmp_path / "ok.png", "x")
    save_png(_random_image(8, 8), tmp_path / "ok.png", "x", overwrite=True)
    assert _files(tmp_path) == ["ok-1.png", "ok.png"]


@pytest.mark.parametrize(
    ("failure", "raised"),
    [(RuntimeError("encoder crashed"), RuntimeError), (OSError(28, "No space left on device"), SdcliError)],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_no_temporary_file_remains_after_a_failure(tmp_path, monkeypatch, failure, raised, overwrite):
    image = _random_image(8, 8)

    def failing_save(*args, **kwargs):
        args[0].write(b"\x89PNG partial")  # something was already written when it failed
        raise failure

    monkeypatch.setattr(image, "save", failing_save)
    with pytest.raises(raised):
        save_png(image, tmp_path / "broken.png", "x", overwrite=overwrite)
    assert _files(tmp_path) == []


def test_write_error_message_names_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SdcliError, match="cannot write") as caught:
        save_png(_random_image(4, 4), blocker / "out.png", None)  # parent is a file
    assert "\n" not in str(caught.value)


def test_an_animated_image_gives_its_first_frame_and_says_so(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    heard = []
    image = load_image(path, heard.append)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert len(heard) == 1 and "animated (3 frames): using its first frame" in heard[0]


def test_a_very_large_image_warns_in_one_line_and_a_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; a small limit keeps the test cheap.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    large, bomb = tmp_path / "large.png", tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(large)  # 1600 pixels: above the limit, below twice it
    Image.new("RGB", (50, 50)).save(bomb)  # 2500 pixels
    heard = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning must not escape
        assert load_image(large, heard.append).size == (40, 40)
    assert len(heard) == 1 and "megapixels" in heard[0]
    for loader in (load_image, load_mask, read_png_parameters):
        with pytest.raises(ImageError, match="decompression bombs"):
            loader(bomb)
