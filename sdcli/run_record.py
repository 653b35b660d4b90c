"""The JSON object --json prints for each written image."""

from __future__ import annotations

from pathlib import Path


def image_record(
    result, model_name: str, model_hash: str, vae: Path | None = None, from_model: list[str] | None = None
) -> dict:
    """Every setting that shapes the written image `result`, and which of them are the model's recommended
    ones (`model_defaults`)."""
    from sdcli.lora_sets import lora_hash
    from sdcli.request import DEFAULTS
    from sdcli.sampler_names import resolve_sampler_and_schedule
    from sdcli.weights import short_hash

    r = result.planned.request
    settings = result.planned.settings
    spec = resolve_sampler_and_schedule(r.sampler, r.schedule)  # with a schedule given, the sampler's base name
    record = {
        "path": str(result.path), "prompt": r.prompt, "negative": r.negative, "seed": r.seed, "steps": r.steps,
        "sampler": spec.display_name, "schedule": spec.schedule, "cfg": r.cfg,
        "size": f"{r.width}x{r.height}",
        "width": r.width, "height": r.height, "clip_skip": r.clip_skip, "model": model_name,
        "model_hash": model_hash, "seconds": round(result.seconds, 3),
    }  # fmt: skip
    if r.init is not None:
        record.update(
            init=str(settings.get("init")), strength=r.strength, resize=settings.get("resize", DEFAULTS.resize)
        )
    if r.mask is not None:
        record.update(
            mask=str(settings.get("mask")), mask_blur=r.mask_blur, invert_mask=bool(settings.get("invert_mask"))
        )
    if r.loras:
        record["loras"] = [
            {"name": ref.name, "path": str(ref.path), "te": ref.te, "unet": ref.unet, "hash": lora_hash(ref.path)}
            for ref in r.loras
        ]
    if vae is not None:
        record.update(vae=str(vae), vae_hash=short_hash(vae))
    if from_model := [key for key in from_model or () if key not in result.planned.job.values]:
        record["model_defaults"] = from_model
    if result.planned.job.line is not None:
        record["line"] = result.planned.job.line
    return record
