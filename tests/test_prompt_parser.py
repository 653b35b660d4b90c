"""Tests for sdcli.prompt_parser: AUTOMATIC1111's emphasis, BREAK, prompt editing and alternation.

Every expected value comes from A1111's own documentation, cited beside it:
- "docstring": the doctest examples in A1111's modules/prompt_parser.py (`parse_prompt_attention` and
  `get_learned_conditioning_prompt_schedules`, stable-diffusion-webui v1.6 and later), or the schedule
  example in the comment at the top of that file;
- "wiki": the stable-diffusion-webui wiki page Features, sections "Attention/emphasis", "BREAK keyword",
  "Prompt editing" and "Alternating Words";
- "rule": a derivation written next to the case from the grammar those pages state.
Weights are written as the products A1111 forms (inner bracket first, then unclosed round, then unclosed
square brackets), so they compare exactly, as A1111's merge of equal neighbouring weights does.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdcli.errors import UsageError
from sdcli.prompt_parser import BREAK, parse_prompt_attention

UP = 1.1  # wiki: "(word) - increase attention to word by a factor of 1.1"
DOWN = 1 / 1.1  # wiki: "[word] - decrease attention to word by a factor of 1.1"

ATTENTION_CASES = [
    # docstring: parse_prompt_attention('normal text') -> [['normal text', 1.0]]
    ("normal text", [("normal text", 1.0)]),
    # docstring: 'an (important) word' -> [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    # docstring: '(unbalanced' -> [['unbalanced', 1.1]]: an unclosed bracket applies to the rest.
    ("(unbalanced", [("unbalanced", UP)]),
    # docstring: '\(literal\]' -> [['(literal]', 1.0]]
    ("\\(literal\\]", [("(literal]", 1.0)]),
    # docstring: '(unnecessary)(parens)' -> [['unnecessaryparens', 1.1]]: equal neighbours are joined.
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    # docstring: house 1.5730000000000004, sky 1.4641000000000006, hill 0.55; the rest 1.1 or 1.0.
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.0 * 1.3 * UP * UP),
            (" ", UP),
            ("on", 1.0 * DOWN * UP),
            (" a ", UP),
            ("hill", 1.0 * 0.5 * UP),
            (", sun, ", UP),
            ("sky", 1.0 * UP * UP * UP * UP),
            (".", UP),
        ],
    ),
    # wiki: "a ((word)) - increase attention to word by a factor of 1.21 (= 1.1 * 1.1)"
    ("a ((word))", [("a ", 1.0), ("word", 1.0 * UP * UP)]),
    # wiki: "a [word] - decrease attention to word by a factor of 1.1"
    ("a [word]", [("a ", 1.0), ("word", 1.0 * DOWN)]),
    # wiki: "a (word:1.5) - increase attention to word by a factor of 1.5"
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    # wiki: "a (word:0.25) - decrease attention to word by a factor of 4 (= 1 / 0.25)"
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    # wiki: "a \(word\) - use literal () characters in prompt"
    ("a \\(word\\)", [("a (word)", 1.0)]),
    # wiki: "anime_\(character\)" keeps the brackets as text.
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
    # rule: [[word]] divides twice.
    ("[[word]]", [("word", 1.0 * DOWN * DOWN)]),
    # rule: an unclosed square bracket divides the rest by 1.1.
    ("a [b", [("a ", 1.0), ("b", 1.0 * DOWN)]),
    # rule: unclosed round, then unclosed square brackets, each over the rest (round applied first).
    ("a [b (c", [("a ", 1.0), ("b ", 1.0 * DOWN), ("c", 1.0 * UP * DOWN)]),
    # rule: a closing bracket with nothing open is kept as text.
    ("a) b] c", [("a) b] c", 1.0)]),
    # rule: a round bracket closed by ']' is text; the round bracket stays open and applies to the rest.
    ("(a] b", [("a] b", UP)]),
    # rule: spaces around an explicit weight are allowed.
    ("(a: 1.5 )", [("a", 1.5)]),
    # rule: an explicit weight only closes a round bracket; with none open ':2)' is text.
    ("a :2) b", [("a :2) b", 1.0)]),
    # rule: weights only work with (); in [a:1.5] the ':1.5' is text and the square bracket divides.
    ("[a:1.5]", [("a:1.5", 1.0 * DOWN)]),
    # rule: a colon not followed by a number and ')' is text; the bracket then weighs 1.1.
    ("(a:b)", [("a:b", UP)]),
    # rule: nesting multiplies, an explicit inner weight first.
    ("((a:2))", [("a", 1.0 * 2.0 * UP)]),
    # rule: '\\' is one literal backslash; a backslash before any other character is dropped.
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    # rule: a negative weight is a number like any other.
    ("(a:-1)", [("a", -1.0)]),
    # rule: an empty prompt is one empty run of weight 1.
    ("", [("", 1.0)]),
    # rule: brackets with nothing inside leave nothing.
    ("()[]", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), ATTENTION_CASES)
def test_parse_prompt_attention_matches_a1111_grammar(prompt: str, expected: list[tuple[str, float]]):
    assert parse_prompt_attention(prompt) == expected


BREAK_CASES = [
    # wiki "BREAK keyword": "Adding a BREAK keyword (must be uppercase) fills the current chunks with padding
    # characters"; the docstring of A1111's parser shows it as ['BREAK', -1], spaces around it dropped.
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    # rule: uppercase only, and only as a whole word.
    ("a break b", [("a break b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    # rule: a comma next to it is a word boundary.
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    # rule: the text on each side keeps its weight; the spaces around BREAK belong to it, leaving empty runs.
    ("(a) BREAK [b]", [("a", UP), ("", 1.0), BREAK, ("", 1.0), ("b", DOWN)]),
    # rule: two breaks in a row leave an empty run between them.
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), BREAK_CASES)
def test_break_word_becomes_the_break_run(prompt: str, expected: list[tuple[str, float]]):
    assert parse_prompt_attention(prompt) == expected


def test_break_inside_brackets_still_breaks_and_keeps_the_bracket_weight_on_both_sides():
    # A1111 multiplies the BREAK marker too, so inside brackets it becomes the word "break" with weight -1.1;
    # here a BREAK is always a chunk break and the words around it keep their weight.
    assert parse_prompt_attention("(a BREAK b)") == [("a", UP), BREAK, ("b", UP)]


def test_weight_that_is_not_a_number_is_a_usage_error():
    with pytest.raises(UsageError, match=r"'1\.2\.3'.*\(word:1\.2\)"):
        parse_prompt_attention("(cat:1.2.3)")


def test_importing_prompt_parser_does_not_import_torch():
    code = "import sys, sdcli.prompt_parser; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
