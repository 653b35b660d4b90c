"""AUTOMATIC1111's prompt language: emphasis weights, BREAK, prompt editing and alternation.

Two readings of a prompt, applied in A1111's order:

1. `prompt_schedule` resolves `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b]` into the prompt
   text that holds for each range of sampling steps (A1111's `get_learned_conditioning_prompt_schedules`).
2. `parse_prompt_attention` reads each of those texts into `(text, weight)` runs: `(x)` is x1.1, `[x]` is
   /1.1, `(x:1.5)` is x1.5, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, and
   `BREAK` ends a 75-token chunk (A1111's `parse_prompt_attention`).

Plain Python, no torch; the grammar is small enough for a hand-written recursive-descent reader.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------------------
# Prompt editing and alternation.
#
# The grammar (A1111's, as its lark grammar accepts it):
#   top        := (part | one of '[' ']' '(' ')' ':')*         stray brackets are text at the top level only
#   prompt     := part*
#   part       := plain | '(' prompt ')' | '(' prompt ':' prompt ')' | '[' prompt ']' | scheduled | alternate
#   scheduled  := '[' [prompt ':'] prompt ':' ws? NUMBER ws? ']'
#   alternate  := '[' prompt ('|' prompt?)+ ']'
#   plain      := (any character but \ [ ] ( ) : |  or  '\' followed by a character that is not a newline)+
# A prompt that does not fit (a '|' outside an alternation, a trailing '\') has no schedule: it is used as
# written at every step, as in A1111.
# ---------------------------------------------------------------------------------------------------------

_NUMBER_AT_END = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_MAX_NESTING = 100  # deeper brackets are read as text, which keeps the recursion far from Python's limit


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # parts shown up to and including step `when`; None when `[to:when]` omits it
    after: tuple
    when: str  # the number as written: a '.' makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]  # one option per step, cycling


class _NoParse(Exception):
    """The text does not fit the grammar at this position."""


class _ScheduleReader:
    """Recursive-descent reader of the grammar above; parts are str, _Scheduled or _Alternate."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def top(self) -> tuple:
        parts: list = []
        while self.pos < len(self.text):
            start = self.pos
            if self.text[start] in "([":
                try:
                    parts.extend(self.part())
                    continue
                except _NoParse:
                    self.pos, self.depth = start, 0  # not a complete construct: the bracket is plain text
            if self.text[start] in "[]():":
                parts.append(self.text[start])
                self.pos = start + 1
            else:
                parts.extend(self.part())
        return tuple(parts)

    def prompt(self) -> tuple:
        if self.depth == _MAX_NESTING:
            raise _NoParse
        self.depth += 1
        parts: list = []
        while self.pos < len(self.text) and self.text[self.pos] not in "]):|":
            parts.extend(self.part())
        self.depth -= 1
        return tuple(parts)

    def part(self) -> list:
        char = self.text[self.pos]
        if char == "(":
            self.pos += 1
            inner = ["(", *self.prompt()]
            if self.take(":"):
                inner += [":", *self.prompt()]
            self.expect(")")
            return [*inner, ")"]
        if char == "[":
            return [self.square()]
        match = _PLAIN.match(self.text, self.pos)
        if match is None:
            raise _NoParse
        self.pos = match.end()
        return [match.group(0)]

    def square(self) -> str | tuple | _Scheduled | _Alternate:
        self.pos += 1
        first = self.prompt()
        if self.take("]"):
            return ("[", *first, "]")
        if self.take("|"):
            options = [first]
            while True:
                options.append(self.prompt())
                if self.take("]"):
                    return _Alternate(tuple(options))
                self.expect("|")
        self.expect(":")
        when = self.number_and_close()
        if when is not None:
            return _Scheduled(None, first, when)
        second = self.prompt()
        self.expect(":")
        when = self.number_and_close()
        if when is None:
            raise _NoParse
        return _Scheduled(first, second, when)

    def number_and_close(self) -> str | None:
        match = _NUMBER_AT_END.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group(1)

    def take(self, char: str) -> bool:
        if self.text.startswith(char, self.pos):
            self.pos += 1
            return True
        return False

    def expect(self, char: str) -> None:
        if not self.take(char):
            raise _NoParse


def _switch_step(when: str, steps: int, old_scheduling: bool) -> int:
    """The last step (1-based) that shows the `from` side of `[from:to:when]`."""
    value = float(when)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = value * steps
    # Clamp before int() so huge or infinite numbers mean "never" / "always" instead of overflowing;
    # int() then truncates toward zero as A1111's does.
    return min(steps, int(max(-1.0, min(float(steps), value))))


def _walk(parts: tuple):
    for part in parts:
        yield part
        if isinstance(part, tuple):
            yield from _walk(part)
        elif isinstance(part, _Scheduled):
            yield from _walk(part.before or ())
            yield from _walk(part.after)
        elif isinstance(part, _Alternate):
            for option in part.options:
                yield from _walk(option)


def _render(parts: tuple, step: int, steps: int, old_scheduling: bool) -> str:
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, tuple):
            out.append(_render(part, step, steps, old_scheduling))
        elif isinstance(part, _Scheduled):
            shown = part.before or () if step <= _switch_step(part.when, steps, old_scheduling) else part.after
            out.append(_render(shown, step, steps, old_scheduling))
        else:
            out.append(_render(part.options[(step - 1) % len(part.options)], step, steps, old_scheduling))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The prompt text for each range of steps: `[(end_step, text), ...]`, end steps rising, the last `steps`.

    A segment's text holds for the steps after the previous segment's end step up to and including its own
    (steps count from 1). `[from:to:when]` shows `from` up to step `when`: a number with a '.' is a fraction
    of `steps` (0.25 of 20 steps is step 5), one without is a step number. `old_scheduling=True` uses
    A1111's older rule instead (a number below 1 is a fraction, any other a step number), which A1111
    records as "Old prompt editing timelines: True". `[a|b]` cycles through its options every step.
    Emphasis brackets are kept as written for `parse_prompt_attention`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    try:
        parts = _ScheduleReader(prompt).top()
    except _NoParse:
        return [(steps, prompt)]

    ends = {steps}
    for part in _walk(parts):
        if isinstance(part, _Scheduled):
            end = _switch_step(part.when, steps, old_scheduling)
            if end >= 1:
                ends.add(end)
        elif isinstance(part, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(parts, end, steps, old_scheduling)) for end in sorted(ends)]


def prompt_schedules(
    prompts: Sequence[str], steps: int, *, old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """`prompt_schedule` for each prompt (A1111's `get_learned_conditioning_prompt_schedules`)."""
    cache: dict[str, list[tuple[int, str]]] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = prompt_schedule(prompt, steps, old_scheduling=old_scheduling)
    return [cache[prompt] for prompt in prompts]
