"""A1111's prompt language end to end: the CLI on a tiny checkpoint against diffusers / k-diffusion given the
prompt embeddings A1111's algorithm produces.

The reference embeddings are built here from transformers' CLIP and tokenizer, following A1111's
modules/sd_hijack_clip.py (`tokenize_line`, `process_tokens`) and modules/prompt_parser.py
(`reconstruct_cond_batch`) step by step: runs from the emphasis parser (tested on its own in
test_prompt_parser.py), tokenized together; 75 tokens per chunk, the words after the last comma moved on when
it is among the last 20 tokens; BREAK closes a chunk; each chunk `start, tokens, end, end...`; each chunk
encoded alone, scaled by its weights and rescaled to its original mean; chunks concatenated.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from kdiffusion_ref import load as load_kdiffusion
from PIL import Image
from reference import reference_models_from_file, reference_pipeline, reference_tokenizer

from sdcli.prompt_parser import BREAK, parse_prompt_attention, prompt_schedule

SEED, STEPS, CFG, SIZE = 4321, 6, 30.0, 64
START, END, COMMA = 49406, 49407, 267

WORDS = "red green blue cat dog house tree river mountain sky".split()
LONG_2 = ", ".join(f"{WORDS[i % 10]} {WORDS[(i * 3) % 10]}" for i in range(30))  # ~89 tokens: 2 chunks
LONG_3 = " ".join(WORDS[(i * 7) % 10] for i in range(160))  # 160 tokens without commas: 3 chunks


def a1111_chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line: (77 ids, 77 weights) per chunk."""
    runs = parse_prompt_attention(text)
    ids_of_runs = tokenizer([t for t, _ in runs], add_special_tokens=False, truncation=False).input_ids
    chunks, tokens, weights, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, weights, last_comma
        pad = 75 - len(tokens)
        chunks.append(([START, *tokens, END] + [END] * pad, [1.0, *weights, 1.0] + [1.0] * pad))
        tokens, weights, last_comma = [], [], -1

    for (run_text, weight), ids in zip(runs, ids_of_runs, strict=True):
        if (run_text, weight) == BREAK:
            next_chunk()
            continue
        for token in ids:
            if token == COMMA:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= 20:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def a1111_embeds(clip, tokenizer, texts: list[str]) -> torch.Tensor:
    """A1111's FrozenCLIPEmbedderWithCustomWords.forward on texts encoded together: (S, 77k, D)."""
    chunked = [a1111_chunks(tokenizer, text) for text in texts]
    count = max(len(c) for c in chunked)
    empty = ([START, END] + [END] * 75, [1.0] * 77)  # A1111's empty_chunk
    chunked = [c + [empty] * (count - len(c)) for c in chunked]
    zs = []
    with torch.no_grad():
        for i in range(count):
            ids = torch.tensor([c[i][0] for c in chunked])
            weights = torch.tensor([c[i][1] for c in chunked])
            z = clip(ids).last_hidden_state
            original_mean = z.mean()
            z = z * weights.unsqueeze(-1)
            zs.append(z * (original_mean / z.mean()))
    return torch.cat(zs, dim=1)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_models_from_file(tiny_checkpoint, TINY_SD1), reference_tokenizer()


def generate(checkpoint: str, out: Path, prompt: str, negative: str, sampler: str) -> np.ndarray:
    result = run_cli(
        "txt2img", prompt, "-n", negative, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
        "--cfg", CFG, "--seed", SEED, "--sampler", sampler, "--dtype", "fp32", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


def to_unit_range(images: torch.Tensor) -> np.ndarray:
    return (images / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()


class ScheduledEpsDenoiser:
    """k-diffusion's eps denoiser on diffusers' UNet with A1111's CFGDenoiser: a step counter picks each
    prompt's scheduled conditioning (first segment whose end step >= step), and the prompt and negative run
    as one batch when their token counts match, apart otherwise."""

    def __init__(self, unet, cond_schedule, uncond_schedule):
        _, external = load_kdiffusion()
        from diffusers import DDPMScheduler

        ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod

        class Wrapped(external.DiscreteEpsDDPMDenoiser):
            def get_eps(self, x, t, context):
                return self.inner_model(x, t, encoder_hidden_states=context).sample

        self.model = Wrapped(unet, ac, quantize=False)
        self.schedules = cond_schedule, uncond_schedule
        self.step = 0

    def at_step(self, schedule):
        return next((cond for end, cond in schedule if self.step <= end), schedule[0][1])

    def __call__(self, x, sigma):
        cond, uncond = (self.at_step(s) for s in self.schedules)
        if cond.shape == uncond.shape:
            both = torch.cat([uncond, cond])
            out_uncond, out_cond = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), context=both).chunk(2)
        else:
            out_uncond, out_cond = self.model(x, sigma, context=uncond), self.model(x, sigma, context=cond)
        self.step += 1
        return out_uncond + CFG * (out_cond - out_uncond)


def reference_schedule(clip, tokenizer, prompt: str) -> list[tuple[int, torch.Tensor]]:
    schedule = prompt_schedule(prompt, STEPS)
    embeds = a1111_embeds(clip, tokenizer, [text for _, text in schedule])
    return [(end, embeds[i : i + 1]) for i, (end, _) in enumerate(schedule)]


def euler_reference(reference, prompt: str, negative: str) -> np.ndarray:
    sampling, _ = load_kdiffusion()
    (unet, vae, clip), tokenizer = reference
    with torch.no_grad():
        denoiser = ScheduledEpsDenoiser(
            unet, reference_schedule(clip, tokenizer, prompt), reference_schedule(clip, tokenizer, negative)
        )
        sigmas = denoiser.model.get_sigmas(STEPS)
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED)) * sigmas[0]
        latents = sampling.sample_euler(denoiser, x, sigmas, disable=True)
        return to_unit_range(vae.decode(latents / 0.18215).sample)


def test_reference_chunks_as_a1111_counts_them(reference):
    _, tokenizer = reference
    assert [len(a1111_chunks(tokenizer, p)) for p in ("", "cat", LONG_2, LONG_3, f"cat BREAK {LONG_2}")] == [
        1, 1, 2, 3, 3,
    ]  # fmt: skip


def test_weighted_two_chunk_prompts_equal_diffusers_given_a1111_embeddings(tiny_checkpoint, reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    (_, _, clip), tokenizer = reference
    prompt = f"a (photo:1.3) of a [cat], ((best quality)), {LONG_2}"
    negative = "(blurry:1.4), " + " ".join(LONG_3.split()[:90])
    cond, uncond = a1111_embeds(clip, tokenizer, [prompt]), a1111_embeds(clip, tokenizer, [negative])
    assert cond.shape == uncond.shape == (1, 154, 128)
    pipe = reference_pipeline(StableDiffusionPipeline, tiny_checkpoint, TINY_SD1)
    expected = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    ours = generate(tiny_checkpoint, tmp_path / "out.png", prompt, negative, "ddim")
    assert np.abs(ours - expected).mean() < 1 / 255


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        (f"(masterpiece, best quality:1.6), {LONG_3}", "[ugly], blurry"),  # 3 chunks against 1: run apart
        ("a cat BREAK (a dog:0.5) BREAK a tree", LONG_2),  # BREAK: 3 chunks against 2
        # editing and alternation
        ("[a photo of a cat:tree river mountain house:2], [red sky|(dog green house tree:1.5)]", "[blurry::0.5] ugly"),
    ],
)
def test_chunked_break_and_edited_prompts_equal_kdiffusion_given_a1111_embeddings(
    tiny_checkpoint, reference, tmp_path, prompt, negative
):
    expected = euler_reference(reference, prompt, negative)
    ours = generate(tiny_checkpoint, tmp_path / "out.png", prompt, negative, "euler")
    assert np.abs(ours - expected).mean() < 1 / 255
