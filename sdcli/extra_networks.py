"""AUTOMATIC1111's extra-network tags in prompts: `<lora:NAME:WEIGHT>` and `<lora:NAME:TE:UNET>`.

As in A1111, every `<kind:...>` tag is removed from the prompt before it is tokenized; `lora` (and its
alias `lyco`) name a LoRA file by its stem, any other kind (hypernetworks) is refused rather than
ignored, since the image would silently differ. Arguments are `:`-separated: positional (name, text-encoder
weight, UNet weight; the UNet weight defaults to the text encoder's, both to 1) or named (`te=`, `unet=`).
`--lora FILE[:WEIGHT]` on the command line names the same thing by path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdcli.errors import UsageError

# A1111's pattern (modules/extra_networks.py): a word, a colon, then anything up to '>'.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a prompt or an option asks for: the name it was given by, its two weights, and its file once
    resolved (`--lora FILE` gives the file; a prompt's name is looked up in the LoRA folder)."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    path: Path | None = None

    def tag(self) -> str:
        """The prompt tag asking for this LoRA, as A1111 writes it."""
        weights = f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"
        return f"<lora:{self.name}:{weights}>"


def _weight(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{where}: weight {text!r} is not a number")
    return value


def _lora_ref(args: str, tag: str) -> LoraRef:
    positional, named = [], {}
    for item in args.split(":"):
        key, equals, value = item.partition("=")
        if equals:
            named[key.strip()] = value
        else:
            positional.append(item)
    if unknown := sorted(named.keys() - {"te", "unet"}):
        raise UsageError(f"{tag}: unknown argument {', '.join(unknown)} (known: te=, unet=)")
    if not positional or not positional[0].strip() or len(positional) > 3:
        raise UsageError(f"{tag}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    name = positional[0].strip()
    te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
    return LoraRef(name, te, unet)


def parse_prompt(prompt: str) -> tuple[str, tuple[LoraRef, ...]]:
    """The prompt without its extra-network tags, and the LoRAs they ask for in the order written.

    Raises UsageError for a malformed tag or a kind of extra network sdcli does not apply.
    """
    refs: list[LoraRef] = []

    def found(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in LORA_KINDS:
            raise UsageError(f"{match.group(0)}: <{kind}:...> extra networks are not supported (only <lora:...>)")
        refs.append(_lora_ref(args, match.group(0)))
        return ""

    return EXTRA_NETWORK.sub(found, prompt), tuple(refs)


def strip_extra_networks(prompt: str) -> str:
    """The prompt as the text encoder sees it: every extra-network tag removed."""
    return EXTRA_NETWORK.sub("", prompt)


def parse_lora_option(text: str) -> LoraRef:
    """`FILE[:WEIGHT]` (the --lora option) as a LoraRef named after the file's stem.

    A trailing `:WEIGHT` counts only when it is a number, so Windows paths (`C:\\loras\\x.safetensors`) work.
    """
    path, colon, weight = text.rpartition(":")
    try:
        value = float(weight) if colon else None
    except ValueError:
        value = None
    if value is None:
        path, value = text, 1.0
    if not math.isfinite(value):
        raise UsageError(f"--lora {text}: the weight must be a finite number")
    if not path:
        raise UsageError(f"--lora {text!r}: give a file, --lora FILE[:WEIGHT]")
    file = Path(path).expanduser()
    return LoraRef(file.stem, value, value, file)
