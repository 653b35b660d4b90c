"""A1111's prompt language end to end: the CLI on a tiny checkpoint against diffusers / k-diffusion given the
prompt embeddings A1111's algorithm produces.

The reference embeddings are built here from transformers' CLIP and tokenizer, following A1111's
modules/sd_hijack_clip.py (`tokenize_line`, `process_tokens`) and modules/prompt_parser.py
(`reconstruct_cond_batch`) step by step: runs from the emphasis parser (tested on its own in
test_prompt_parser.py), tokenized together; 75 tokens per chunk, the words after the last comma moved on when
it is among the last 20 tokens; BREAK closes a chunk; each chunk `start, tokens, end, end...`; each chunk
encoded alone, scaled by its weights and rescaled to its original mean; chunks concatenated.
"""

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SD1, run_cli
from kdiffusion_ref import eps_denoiser
from kdiffusion_ref import load as load_kdiffusion
from PIL import Image
from reference import reference_models_from_file, reference_pipeline, reference_tokenizer

from sdcli.images import read_png_parameters, save_png
from sdcli.infotext import parse_infotext
from sdcli.jobs import job_from_png
from sdcli.prompt_parser import BREAK, parse_prompt_attention, prompt_schedule
from sdcli.rng_philox import CudaRandn

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


def a1111_embeds(clip, tokenizer, texts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """A1111's FrozenCLIPEmbedderWithCustomWords.forward on texts encoded together: (S, 77k, D); with clip
    skip n, the n-th hidden state from the end, final-normed (A1111's encode_with_transformers)."""
    chunked = [a1111_chunks(tokenizer, text) for text in texts]
    count = max(len(c) for c in chunked)
    empty = ([START, END] + [END] * 75, [1.0] * 77)  # A1111's empty_chunk
    chunked = [c + [empty] * (count - len(c)) for c in chunked]
    zs = []
    with torch.no_grad():
        for i in range(count):
            ids = torch.tensor([c[i][0] for c in chunked])
            weights = torch.tensor([c[i][1] for c in chunked])
            hidden = clip(ids, output_hidden_states=True).hidden_states[-clip_skip]
            z = getattr(clip, "text_model", clip).final_layer_norm(hidden)
            original_mean = z.mean()
            z = z * weights.unsqueeze(-1)
            zs.append(z * (original_mean / z.mean()))
    return torch.cat(zs, dim=1)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_models_from_file(tiny_checkpoint, TINY_SD1), reference_tokenizer()


def generate(checkpoint: str, out: Path, prompt: str, negative: str, sampler: str, *extra) -> np.ndarray:
    result = run_cli(
        "txt2img", prompt, "-n", negative, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS,
        "--cfg", CFG, "--seed", SEED, "--sampler", sampler, "--dtype", "fp32", "-o", out, *extra,
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
        self.model = eps_denoiser(unet)
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


def reference_schedule(
    clip, tokenizer, prompt: str, clip_skip: int = 1, steps: int = STEPS
) -> list[tuple[int, torch.Tensor]]:
    schedule = prompt_schedule(prompt, steps)
    embeds = a1111_embeds(clip, tokenizer, [text for _, text in schedule], clip_skip)
    return [(end, embeds[i : i + 1]) for i, (end, _) in enumerate(schedule)]


def euler_reference(
    reference, prompt: str, negative: str, noise: torch.Tensor | None = None, clip_skip: int = 1
) -> np.ndarray:
    sampling, _ = load_kdiffusion()
    (unet, vae, clip), tokenizer = reference
    with torch.no_grad():
        denoiser = ScheduledEpsDenoiser(
            unet,
            reference_schedule(clip, tokenizer, prompt, clip_skip),
            reference_schedule(clip, tokenizer, negative, clip_skip),
        )
        sigmas = denoiser.model.get_sigmas(STEPS)
        if noise is None:
            noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
        x = noise * sigmas[0]
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


def test_clip_skip_and_an_edit_between_texts_of_different_chunk_counts(tiny_checkpoint, reference, tmp_path):
    prompt = f"[(a cat:1.4):{LONG_2}:2]"  # 1 chunk, then 2: the first text gets an empty chunk (A1111)
    expected = euler_reference(reference, prompt, "ugly", clip_skip=2)
    ours = generate(tiny_checkpoint, tmp_path / "out.png", prompt, "ugly", "euler", "--clip-skip", 2)
    assert np.abs(ours - expected).mean() < 1 / 255


def with_embedding(reference, vectors: torch.Tensor):
    """The reference CLIP and tokenizer with an embedding's vectors appended as new tokens <ti0>, <ti1>, ...
    (as diffusers' load_textual_inversion loads one)."""
    (unet, vae, clip), tokenizer = reference
    clip, tokenizer = copy.deepcopy(clip), copy.deepcopy(tokenizer)
    names = [f"<ti{i}>" for i in range(len(vectors))]
    tokenizer.add_tokens(names)
    clip.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        clip.get_input_embeddings().weight[-len(vectors) :] = vectors
    return ((unet, vae, clip), tokenizer), "".join(names)


def write_embedding(directory: Path, name: str, vectors: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    save_file({"emb_params": vectors}, directory / f"{name}.safetensors")
    return directory / f"{name}.safetensors"


def test_embeddings_equal_the_reference_with_their_vectors_as_new_tokens(tiny_checkpoint, reference, tmp_path):
    vectors = torch.randn(2, 128, generator=torch.Generator().manual_seed(7))
    write_embedding(tmp_path / "emb", "mystyle", vectors)
    prompt = "a (cat:1.2) in mystyle, (embedding:mystyle:0.6) sky"
    extended, tokens = with_embedding(reference, vectors)
    expected = euler_reference(extended, prompt.replace("embedding:mystyle", tokens).replace("mystyle", tokens), "ugly")
    ours = generate(
        tiny_checkpoint, tmp_path / "out.png", prompt, "ugly", "euler", "--embeddings-dir", tmp_path / "emb"
    )
    assert np.abs(ours - expected).mean() < 1 / 255


def test_rng_cuda_starts_from_the_noise_torch_draws_on_a_cuda_device(tiny_checkpoint, reference, tmp_path):
    noise = CudaRandn(SEED).randn((1, 4, SIZE // 8, SIZE // 8))  # equal to torch's CUDA randn: test_rng_philox
    expected = euler_reference(reference, "a cat", "ugly", noise)
    ours = generate(tiny_checkpoint, tmp_path / "out.png", "a cat", "ugly", "euler", "--rng", "cuda")
    assert np.abs(ours - expected).mean() < 1 / 255
    assert parse_infotext(read_png_parameters(tmp_path / "out.png"))[2]["RNG"] == "NV"


def test_from_png_reproduces_an_image_whose_prompt_uses_all_of_the_syntax(tiny_checkpoint, tmp_path):
    path = write_embedding(tmp_path / "emb", "mystyle", torch.randn(3, 128, generator=torch.Generator().manual_seed(3)))
    prompt = f"(masterpiece:1.2), [a photo of a cat:a dog:2] in mystyle, [red|blue] BREAK {LONG_2}"
    negative = "[blurry::0.5], embedding:mystyle, \\(ugly\\)"
    first = tmp_path / "first.png"
    generate(tiny_checkpoint, first, prompt, negative, "euler", "--rng", "cuda", "--embeddings-dir", tmp_path / "emb")
    made_prompt, made_negative, params = parse_infotext(read_png_parameters(first))
    assert (made_prompt, made_negative) == (prompt, negative)
    assert params["TI hashes"] == f"mystyle: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert params["RNG"] == "NV"
    again = tmp_path / "again.png"
    result = run_cli("txt2img", "--from-png", first, "-m", tiny_checkpoint, "--dtype", "fp32",
                     "--embeddings-dir", tmp_path / "emb", "-o", again)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == first.read_bytes()


@pytest.mark.parametrize(
    ("params", "rng"),
    [
        ("Steps: 20, Sampler: Euler, Seed: 1, Version: v1.7.0", "cuda"),  # A1111's default: GPU
        ("Steps: 20, Sampler: Euler, Seed: 1, RNG: CPU, Version: v1.7.0", "cpu"),
        ("Steps: 20, Sampler: Euler, Seed: 1, RNG: NV, Version: v1.7.0", "cuda"),
        ("Steps: 20, Sampler: Euler, Seed: 1, Version: sdcli 0.1.0", "cpu"),  # before sdcli wrote RNG
    ],
)
def test_from_png_reads_the_rng_as_a1111_does(tmp_path, params, rng):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", f"a cat\n{params}")
    assert job_from_png(str(path)).job.values["rng"] == rng


def test_heun_schedules_edits_over_its_model_calls_as_a1111(tiny_checkpoint, reference, tmp_path):
    # A1111's setup_conds schedules a "second order" sampler's prompts over total_steps = 2 * steps, and its
    # CFGDenoiser counts model calls. Heun's 6 steps make 11 calls; [cat:dog:5] holds the cat for calls 0-5
    # (steps 0-2) and the dog from call 6 (step 3) on. Counted in sampler steps, the cat would hold throughout.
    sampling, _ = load_kdiffusion()
    (unet, vae, clip), tokenizer = reference
    prompt = "[a photo of a cat:a photo of a dog:5]"
    with torch.no_grad():
        denoiser = ScheduledEpsDenoiser(
            unet,
            reference_schedule(clip, tokenizer, prompt, steps=2 * STEPS),
            reference_schedule(clip, tokenizer, "ugly", steps=2 * STEPS),
        )
        sigmas = denoiser.model.get_sigmas(STEPS)
        noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
        latents = sampling.sample_heun(denoiser, noise * sigmas[0], sigmas, disable=True)
        expected = to_unit_range(vae.decode(latents / 0.18215).sample)
    assert denoiser.step == 2 * STEPS - 1
    ours = generate(tiny_checkpoint, tmp_path / "heun.png", prompt, "ugly", "heun")
    assert np.abs(ours - expected).mean() < 1 / 255


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        # Heun, 6 steps: 11 calls over a schedule of 12, [cat:dog:5] ends the cat after call 5.
        ("heun", [0] * 6 + [1] * 5),
        # Euler: one call a step over a schedule of 6; the cat holds for steps 0-5, all of them.
        ("euler", [0] * 6),
        # DPM++ 2S a: as Heun, 2 calls a step but 1 for the last (to sigma 0).
        ("dpmpp_2s_a", [0] * 6 + [1] * 5),
    ],
)
def test_each_model_call_sees_the_text_a1111s_call_count_picks(
    tiny_checkpoint, tmp_path, monkeypatch, sampler, expected
):
    import sdcli.pipeline

    seen, made = [], []
    original = sdcli.pipeline.guided_unet

    def spy(unet, cond, uncond, cfg):
        guided = original(unet, cond, uncond, cfg)
        made.append(cond)
        label = len(made) - 1

        def call(x, t):
            seen.append(label)
            return guided(x, t)

        return call

    monkeypatch.setattr(sdcli.pipeline, "guided_unet", spy)
    generate(tiny_checkpoint, tmp_path / "out.png", "[a photo of a cat:a photo of a dog:5]", "ugly", sampler)
    assert seen == expected
