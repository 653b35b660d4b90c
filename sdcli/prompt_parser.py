"""AUTOMATIC1111's prompt language: emphasis weights and BREAK.

`parse_prompt_attention` reads a prompt into `(text, weight)` runs: `(x)` is x1.1, `[x]` is /1.1,
`(x:1.5)` is x1.5, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, and `BREAK`
ends a 75-token chunk (A1111's `parse_prompt_attention`).

Plain Python, no torch.
"""

from __future__ import annotations

import re

from sdcli.errors import UsageError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0
BREAK = ("BREAK", BREAK_WEIGHT)  # the run that stands for a chunk break, as A1111 writes it

# One lexical unit of the emphasis language, tried in this order at each position.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                      # escaped bracket or backslash: the character itself
    | \\                              # any other backslash is dropped
    | [(\[]                           # opening bracket
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\) # ':1.5)' closes a round bracket with an explicit weight
    | [)\]]                           # closing bracket
    | [^\\()\[\]:]+                   # plain text
    | :                               # a colon that is not a weight is plain text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(text, weight)` runs with A1111's emphasis rules.

    Brackets left open apply their multiplier to the rest of the prompt; a closing bracket with nothing to
    close is plain text. Weights multiply in the order A1111 applies them (innermost bracket first, then
    unclosed round, then unclosed square brackets), so runs compare equal exactly when A1111's do, and
    neighbouring runs of equal weight are joined. Each `BREAK` word becomes the run `BREAK`
    (`("BREAK", -1.0)`); unlike A1111, whose brackets would turn it into the word "break" with a negative
    weight, brackets never change it. An empty prompt gives `[("", 1.0)]`.

    Raises UsageError for an explicit weight that is not a number, such as `(cat:1.2.3)`.
    """
    runs: list[list] = []  # [text, weight, is_break], mutable while brackets close
    open_round: list[int] = []  # index in `runs` where each unclosed bracket started
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            runs.append([token[1:], 1.0, False])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _parse_weight(weight, text))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i:
                    runs.append([*BREAK, True])
                runs.append([part, 1.0, False])

    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1] and not (merged[-1][2] or run[2]):
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, run_weight) for run_text, run_weight, _ in merged] or [("", 1.0)]


def _parse_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise UsageError(
            f"emphasis weight {weight!r} in prompt {prompt!r} is not a number; write it like (word:1.2)"
        ) from None
