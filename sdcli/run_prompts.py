"""A run's prompts read against the embeddings folder: warnings about their doubtful parts, and, with
--show-tokens (or `sdcli tokens`), how each is read."""

from __future__ import annotations

from collections.abc import Callable


def check_prompts(opts: dict, family, planned: list, warn: Callable[[str], None], out: Callable[[str], object]):
    """Warn about the planned images' prompts and negatives (each once); returns the embeddings library."""
    texts = dict.fromkeys((p.request.prompt, p.request.steps) for p in planned)
    texts.update(dict.fromkeys((p.request.negative, p.request.steps) for p in planned if p.request.negative))
    return show_prompts(opts, family, list(texts), warn, out)


def show_prompts(
    opts: dict, family, texts: list[tuple[str, int]], warn: Callable[[str], None], out: Callable[[str], object]
):
    """Warn about each prompt's doubtful parts; with show_tokens, write how it is read. Returns the library."""
    from sdcli.prompt_encoding import describe_prompt, prompt_warnings
    from sdcli.run_files import embedding_library
    from sdcli.text_encoders import make_tokenizer

    library = embedding_library(opts)
    for text, steps in texts:
        for message in prompt_warnings(text, library.missing(text)):
            warn(message)
        if opts.get("show_tokens"):
            spec = family.text_encoders[0]
            vectors = {name: e.vectors[0] for name, e in library.used_in([text], family).items()}
            lines = describe_prompt(text, steps, spec, make_tokenizer(spec), vectors)
            out("\n".join([f"prompt: {text}", *lines]) + "\n")
    return library
