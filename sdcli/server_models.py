"""AUTOMATIC1111's `/sdapi/v1` payloads as pydantic models, and which of their fields sdcli honours.

A field sdcli supports is typed, so a wrong type is a 422. A1111 fields sdcli does not support are accepted
only at the value that leaves the image unchanged (`NEUTRAL`): any other value is a 422 naming the field,
since ignoring it would return a different image than the client asked for. Fields that never change the
image (`HARMLESS`) are accepted and ignored. Any other field is a 422 (it might change the image).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Fields that never change the pixels: saving and UI switches, hires-fix settings without `enable_hr`,
# script arguments without a script, img2img options of modes sdcli does not offer.
HARMLESS = (
    "do_not_save_samples", "do_not_save_grid", "save_images", "override_settings_restore_afterwards",
    "sampler_index", "comments", "force_task_id", "script_args", "include_init_images",
    "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "hr_additional_modules", "inpaint_full_res_padding", "image_cfg_scale", "refiner_switch_at", "user",
    "subseed", "infotext_label", "s_tmin", "s_tmax",  # these two only bound s_churn, which must be 0
    "inpaint_full_res",  # A1111's "only masked": refused by sdcli.server when a mask comes with it
)  # fmt: skip


def _is_zero(value: Any) -> bool:
    return value is None or value == 0


# Supported-by-A1111-only fields, with the test a value must pass to leave the image as sdcli makes it.
NEUTRAL: dict[str, Any] = {
    "enable_hr": lambda v: not v,
    "restore_faces": lambda v: not v,
    "tiling": lambda v: not v,
    "styles": lambda v: not v,
    "script_name": lambda v: not v,
    "alwayson_scripts": lambda v: not v,
    "refiner_checkpoint": lambda v: not v,
    "firstpass_image": lambda v: not v,
    "infotext": lambda v: not v,
    "latent_mask": lambda v: not v,
    "mask_round": lambda v: v is None or v is True,
    "subseed_strength": _is_zero,
    "seed_resize_from_h": lambda v: v is None or v <= 0,
    "seed_resize_from_w": lambda v: v is None or v <= 0,
    "s_churn": _is_zero,
    "s_min_uncond": _is_zero,
    "initial_noise_multiplier": lambda v: v is None or v == 1,
    # sdcli starts inpainting from the original pixels (A1111's 1, "original"); 0 ("fill") is A1111's
    # default, which clients send without meaning it, and differs only below denoising strength 1.
    "inpainting_fill": lambda v: v in (None, 0, 1),
}

# A1111's resize_mode -> sdcli's --resize (3, "latent upscale", has no counterpart).
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fit"}
# override_settings keys sdcli applies.
OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


class Txt2ImgRequest(BaseModel):
    """The body of POST /sdapi/v1/txt2img. Omitted settings take sdcli's defaults (and the model's size)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None  # checked against the sampler: see sdcli.server
    s_noise: float | None = None
    denoising_strength: float | None = None  # txt2img: hires fix only, which sdcli refuses
    send_images: bool = True
    disable_extra_networks: bool = False  # A1111: the prompt's <lora:...> tags are removed but not applied
    override_settings: dict[str, Any] | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """The body of POST /sdapi/v1/img2img: init_images (base64) and, for inpainting, mask."""

    init_images: list[str] = Field(min_length=1)
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_mask_invert: int = 0
    resize_mode: int = 1  # sdcli's default, crop; A1111's API default is 0, stretch


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class OptionsRequest(BaseModel):
    """POST /sdapi/v1/options: the settings sdcli lets a client change."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: int | None = Field(None, ge=1)


def unsupported_fields(payload: BaseModel) -> list[str]:
    """The fields of `payload` that would change the image in ways sdcli cannot honour, or that it does not
    know (`override_settings.KEY` for settings)."""
    bad = []
    for name, value in (payload.model_extra or {}).items():
        if name in HARMLESS:
            continue
        test = NEUTRAL.get(name)
        if test is None or not _passes(test, value):
            bad.append(name)
    for key in payload.override_settings or {}:
        if key not in OVERRIDES:
            bad.append(f"override_settings.{key}")
    return bad


def _passes(test, value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # a value of a type the test cannot compare is not the neutral one
        return False
