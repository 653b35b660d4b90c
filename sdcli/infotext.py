"""AUTOMATIC1111's "infotext": the ``parameters`` text a PNG carries (prompt, negative prompt, and one line of
``Key: value`` pairs), which A1111's PNG Info, civitai and most image browsers read and write.

Only the text format lives here; reading and writing the PNG chunk is `sdcli.images`' job.
"""

from __future__ import annotations

import json
import re

# Same pattern as A1111's modules/infotext_utils.py: a key (word char, then word chars, spaces, '-' or '/'),
# a colon, then either a JSON-quoted string or anything up to the next comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY_RE = re.compile(r"\w[\w \-/]+")
_NEGATIVE_PREFIX = "Negative prompt:"
# A1111 only treats the last line as the parameters line when the pattern matches at least this often,
# so a prompt that happens to contain one "word: word" is not mistaken for parameters.
_MIN_PARAMS_ON_LAST_LINE = 3


def _quote(value: str) -> str:
    """Quote a parameter value as A1111's ``quote()`` does: JSON (non-ASCII kept) when it contains a comma,
    a newline or a colon. Also quoted here, where A1111 would lose or change the value when reading it back:
    a value starting with a double quote (A1111 would unquote it), one with surrounding whitespace (the
    parser strips it) and one containing a carriage return. A1111 reads all of these correctly."""
    if any(c in value for c in ",:\n\r") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value  # as A1111: a value that only looks quoted is kept as written
    return decoded if isinstance(decoded, str) else value


def format_infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    """Build A1111's infotext: the prompt (may span lines), ``Negative prompt: ...`` when ``negative`` is
    non-empty, then one line ``Key: value, Key: value, ...`` in the dict's order.

    Values are written with ``str()`` and quoted where needed (see ``_quote``); None values are left out, as
    A1111 does. Keys must match A1111's key pattern (at least two characters: letters, digits, ``_``, space,
    ``-``, ``/``, starting with a letter, digit or ``_``). A1111 only recognizes a last line with at least
    three ``key: value`` pairs as parameters, so pass at least three.
    """
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if not _KEY_RE.fullmatch(key) or key != key.strip():
            raise ValueError(f"infotext key {key!r} does not match A1111's key pattern")
        pairs.append(f"{key}: {_quote(str(value))}")
    negative_line = f"\n{_NEGATIVE_PREFIX} {negative}" if negative else ""
    # Same assembly (and final strip) as A1111's create_infotext.
    return f"{prompt}{negative_line}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split A1111 infotext into (prompt, negative prompt, parameters), as A1111's
    ``parse_generation_parameters`` does.

    The last line holds the parameters only when A1111's ``key: value`` pattern matches it at least three
    times; otherwise it belongs to the prompt. Lines from the first ``Negative prompt:`` line up to the
    parameters line are the negative prompt. Each prompt line is stripped, as A1111 does. Parameter values
    are returned as strings, JSON-unquoted; unlike A1111 no defaults are added, ``Size`` is not split into
    ``Size-1``/``Size-2``, and an empty value is kept as "" instead of being dropped.
    """
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < _MIN_PARAMS_ON_LAST_LINE:
        lines.append(last_line)
        last_line = ""

    prompt = ""
    negative = ""
    in_negative = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        # A1111 joins with "\n" only once the text is non-empty, so leading empty lines vanish; kept so that
        # "Negative prompt:" alone on its line followed by the text parses as A1111 parses it.
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    params = {key: _unquote(value) for key, value in _PARAM_RE.findall(last_line)}
    return prompt, negative, params


# A1111 1.9's "Schedule type" labels (modules/sd_schedulers.py) for our schedules. Its "Uniform" and "Normal"
# are both k-diffusion's evenly spaced training steps, our "normal"; its "Beta" spaces sigmas at the Beta
# quantiles where ours (ComfyUI's) spaces training steps, so A1111 reads our "Beta" as a similar, not the same,
# grid. Trailing, leading and LCM have no A1111 label; they are written under these names.
SCHEDULE_LABELS = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "trailing": "Trailing",
    "leading": "Leading",
    "lcm": "LCM",
}
# Labels read back: ours, A1111's other name for the same grid and its spelling without a space.
_LABEL_SCHEDULES = {label.lower(): name for name, label in SCHEDULE_LABELS.items()} | {
    "uniform": "normal",
    "sgmuniform": "sgm_uniform",
}
AUTOMATIC = "Automatic"  # A1111: the sampler's own schedule


def schedule_label(schedule: str) -> str:
    """The "Schedule type" label of one of our schedules ("karras" -> "Karras")."""
    return SCHEDULE_LABELS[schedule]


def schedule_from_label(label: str) -> str | None:
    """Our schedule for a "Schedule type" label; None for "Automatic" (the sampler's own). A label we do not
    know (A1111's "KL Optimal", "Align Your Steps", ...) is returned as written, for the request's check to
    name it."""
    key = label.strip().lower()
    if key == AUTOMATIC.lower():
        return None
    return _LABEL_SCHEDULES.get(key, label.strip())
