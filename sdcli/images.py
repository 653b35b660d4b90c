"""Images in and out: PIL <-> tensors, loading inputs and masks, resizing, and atomic PNG writing with
AUTOMATIC1111's ``parameters`` text chunk (its format lives in `sdcli.infotext`).

torch and numpy are imported inside the functions that need them, so importing this module (and therefore
``sdcli --help``) stays fast.
"""

from __future__ import annotations

import errno
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from sdcli.errors import ImageError, SdcliError

if TYPE_CHECKING:
    import torch

ResizeMode = Literal["crop", "fit", "stretch"]

_MAX_NAME_ATTEMPTS = 100_000


# ---------------------------------------------------------------------------------------------------------
# Tensors <-> PIL


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert decoded images ``(B, 3, H, W)`` in [-1, 1] to RGB PIL images (``(B, 1, H, W)`` gives "L").

    Bit-for-bit the same as diffusers' ``VaeImageProcessor().postprocess(x, output_type="pil")`` for float32
    input: ``(x * 0.5 + 0.5).clamp(0, 1)``, then ``* 255``, round half to even (numpy's ``round``), uint8.
    The arithmetic is always float32 on the CPU, whatever the input's dtype and device (diffusers denormalizes
    in the input dtype, so fp16/bf16 input can differ from it by one level). NaN pixels, which an fp16 VAE can
    produce on overflow, become 0 (black) instead of an undefined cast.
    """
    import numpy as np
    import torch

    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
    x = images.detach().to(device="cpu", dtype=torch.float32)
    x = (x * 0.5 + 0.5).clamp(0, 1).nan_to_num(nan=0.0)
    # diffusers goes to numpy before scaling; doing the same keeps the float32 rounding identical.
    array = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    return [Image.fromarray(a) for a in array]


def from_pil(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float32 tensor ``(1, 3, H, W)`` in [-1, 1], as diffusers' preprocess does
    (``/ 255`` in float32, then ``2 * x - 1``). Non-RGB images are converted to RGB first."""
    import numpy as np
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)
    return 2.0 * tensor - 1.0


# ---------------------------------------------------------------------------------------------------------
# Reading images and masks


def _open_upright(path: Path | str, what: str, warn: Callable[[str], None] | None = None) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied; ImageError if that fails.

    An animated image (GIF, APNG, WebP) gives its first frame, with a warning. An image past Pillow's
    decompression-bomb limit is refused, and one past its warning limit is decoded with our one-line
    warning instead of Pillow's.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{what} not found: {path}; check the path")
    if path.is_dir():
        raise ImageError(f"{what} is a directory, not an image: {path}; pass an image file such as a PNG or JPEG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                frames = getattr(opened, "n_frames", 1)
                opened.seek(0)
                opened.load()  # decode now, so a truncated file fails here and not later in the pipeline
                # Phone photos are stored sideways with an EXIF tag saying how to turn them; the model must see
                # them the way a viewer shows them.
                image = ImageOps.exif_transpose(opened)
        except Image.DecompressionBombError:
            raise ImageError(_too_large(path, what)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ImageError(
                f"cannot read {what} {path}: {reason}; pass an image file Pillow can read (PNG, JPEG, WebP, ...)"
            ) from error
    if warn is not None:
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            megapixels = image.width * image.height / 1e6
            warn(f"{what} {path} is {megapixels:.0f} megapixels: decoding it takes a lot of memory")
        if frames > 1:
            warn(f"{what} {path} is animated ({frames} frames): using its first frame")
    return image


def _too_large(path: Path, what: str) -> str:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6  # Pillow refuses images twice its warning limit
    return (
        f"{what} {path} has more than {limit:.0f} megapixels, more than sdcli decodes (a guard against "
        "decompression bombs): scale it down first"
    )


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit greyscale at 255 (almost everything turns white); scale it instead.
    if image.mode == "I" or image.mode.startswith("I;16"):
        return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    return image


def load_image(path: Path | str, warn: Callable[[str], None] | None = None) -> Image.Image:
    """Load any image Pillow reads as RGB: EXIF orientation applied, transparent pixels composited on white.

    Raises ImageError, with a one-line message naming the file, when it is missing or not a readable image.
    `warn` hears about animated and very large images.
    """
    image = _sixteen_bit_to_8(_open_upright(path, "image", warn))
    if _has_alpha(image):
        # White, not black: transparent areas are usually "background", and A1111 flattens onto white too.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_mask(path: Path | str, warn: Callable[[str], None] | None = None) -> Image.Image:
    """Load an inpainting mask as an "L" image where 255 (white) means repaint and 0 means keep.

    As A1111's ``create_binary_mask``: a mask with an alpha channel that is not fully opaque uses the alpha
    channel (opaque = repaint, the way a brush stroke on a transparent layer looks); any other mask uses its
    luminance. An all-opaque alpha channel carries no information, so such a mask falls back to luminance.
    Values in between are kept; thresholding or blurring is the pipeline's choice.
    """
    image = _sixteen_bit_to_8(_open_upright(path, "mask", warn))
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def feather_mask(mask: Image.Image, blur: int = 4, invert: bool = False) -> Image.Image:
    """The mask inpainting uses: optionally inverted, its edge softened by a Gaussian blur of `blur` pixels.

    Raises ImageError when nothing is left to repaint (an all-black mask).
    """
    if invert:
        mask = ImageOps.invert(mask.convert("L"))
    if mask.getextrema()[1] == 0:
        raise ImageError("the mask is all black, so there is nothing to inpaint: paint the area to repaint white")
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def paste_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The generated image where the mask is white, the original where it is black, blended between.

    Where the mask is 0 the result is the original pixel for pixel, so the kept area is exactly the input.
    """
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))


# ---------------------------------------------------------------------------------------------------------
# Resizing


def size_multiple_of_8(width: int, height: int) -> tuple[int, int]:
    """Round a size down to multiples of 8, the VAE's downsampling factor."""
    return width // 8 * 8, height // 8 * 8


def resize_to(image: Image.Image, width: int, height: int, mode: ResizeMode = "crop") -> Image.Image:
    """Resize an image to exactly ``width`` x ``height`` with LANCZOS, keeping its mode.

    - ``"crop"``: scale to cover the target, then centre-crop (A1111 "Crop and resize"; diffusers "crop").
    - ``"fit"``: scale to fit inside the target, centre it, and fill the bands on either side by stretching
      the image's outermost rows or columns outward (A1111 "Resize and fill"; diffusers "fill"). The fill
      uses A1111's own construction, so it matches A1111 and diffusers pixel for pixel, except that the far
      band is sized to the real remainder: A1111 sizes both bands alike, which leaves a one-pixel black line
      when the target side is odd and the scaled side even.
    - ``"stretch"``: plain resize, ignoring the aspect ratio (A1111 "Just resize").
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if mode == "stretch":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    if mode not in ("crop", "fit"):
        raise ValueError(f"unknown resize mode {mode!r}; expected 'crop', 'fit' or 'stretch'")

    ratio = width / height
    src_ratio = image.width / image.height
    # Integer arithmetic exactly as A1111 does it, so sizes (and hence pixels) agree with it.
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    canvas.paste(resized, box=(left, top))
    if mode == "crop":
        return canvas

    # Resizing a zero-height (or zero-width) box at the edge stretches the edge pixels outward. Pillow's
    # default filter here (bicubic) blends the few outermost rows, exactly as A1111's code does.
    bottom = height - top - src_h
    right = width - left - src_w
    if top > 0:
        canvas.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
    if bottom > 0:
        edge = (0, resized.height, width, resized.height)
        canvas.paste(resized.resize((width, bottom), box=edge), box=(0, top + src_h))
    if left > 0:
        canvas.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
    if right > 0:
        edge = (resized.width, 0, resized.width, height)
        canvas.paste(resized.resize((right, height), box=edge), box=(left + src_w, 0))
    return canvas


# ---------------------------------------------------------------------------------------------------------
# Writing PNGs


def _png_info(parameters: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        # As A1111 (modules/images.py): add_text writes tEXt when the text is latin-1 and switches to an
        # uncompressed UTF-8 iTXt chunk otherwise, so non-latin-1 prompts survive and readers see a str.
        info.add_text("parameters", parameters)
    return info


def _create_temporary(directory: Path, name: str) -> tuple[int, Path]:
    # Not mkstemp: it creates files with mode 0600, and the renamed image would keep that. os.open with
    # 0o666 lets the umask decide, as for any file the user creates.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = directory / f".{name[:100]}.{secrets.token_hex(6)}.tmp"  # stays under NAME_MAX
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue


def _numbered(path: Path, number: int) -> Path:
    return path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def _claim_name(temporary: Path, target: Path) -> Path:
    """Give ``temporary`` the first free name among target, target-1, target-2, ... without ever replacing a
    file: a hard link fails with FileExistsError when the name is taken, atomically, so two processes saving
    under the same name at once both keep their image."""
    for number in range(_MAX_NAME_ATTEMPTS):
        candidate = _numbered(target, number)
        try:
            os.link(temporary, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        # This filesystem has no hard links (FAT, some network shares): claim the name with an exclusive
        # create, then move the finished file over the empty placeholder.
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        os.replace(temporary, candidate)
        return candidate
    raise SdcliError(f"cannot find a free file name like {target}; choose another output name")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows or on some filesystems, where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(image: Image.Image, path: Path | str, parameters: str | None = None, overwrite: bool = False) -> Path:
    """Write ``image`` as a PNG at ``path`` with an optional A1111 ``parameters`` chunk; return the path written.

    The file is written to a hidden temporary file in the same directory, fsynced, then renamed into place,
    so a reader never sees a half-written image. Without ``overwrite`` an existing file is never replaced: the
    first free name of ``name.png``, ``name-1.png``, ``name-2.png``, ... is claimed atomically. With
    ``overwrite`` the file is replaced atomically. The temporary file is removed whatever happens. The same
    image and parameters always give the same bytes (no timestamps). Missing parent directories are created.
    Raises SdcliError when the file cannot be written.
    """
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = _create_temporary(directory, path.name)
    except OSError as error:
        raise SdcliError(f"cannot write {path}: {error.strerror or error}; check the output directory") from error
    try:
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG", pnginfo=_png_info(parameters))
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
            written = path
        else:
            written = _claim_name(temporary, path)
    except OSError as error:
        raise SdcliError(f"cannot write {path}: {error.strerror or error}; check the disk and permissions") from error
    finally:
        # After a hard link or on failure the temporary name still exists; after a rename it is already gone.
        temporary.unlink(missing_ok=True)
    _fsync_directory(directory)
    return written


def read_png_parameters(path: Path | str) -> str | None:
    """Return the ``parameters`` text stored in an image (A1111's PNG chunk), or None when there is none.

    Raises ImageError when the file is missing or not an image.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder: pass one image file")
    if not path.is_file():
        raise ImageError(f"image not found: {path}; check the path")
    try:
        # Only the text is wanted: the size limit that guards decoding pixels does not apply.
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # PNG ``text`` also reads text chunks stored after the image data; ``info`` covers other formats.
            text = getattr(image, "text", None) or image.info
            value = text.get("parameters")
    except Image.DecompressionBombError:
        raise ImageError(_too_large(path, "image")) from None
    except (OSError, ValueError, SyntaxError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"cannot read image {path}: {reason}; pass a PNG written by sdcli or A1111") from error
    return None if value is None else str(value)
