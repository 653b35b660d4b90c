"""A1111's extra-network tags: parsed and removed as A1111's `parse_prompt` and its LoRA network read them
(positional NAME:TE:UNET, UNET defaulting to TE and TE to 1; named te=/unet= overriding), and --lora FILE[:W]."""

from pathlib import Path

import pytest

from sdcli.errors import UsageError
from sdcli.extra_networks import LoraRef, parse_lora_option, parse_prompt, strip_extra_networks


@pytest.mark.parametrize(
    ("prompt", "text", "refs"),
    [
        ("a cat", "a cat", ()),
        ("a cat <lora:style:0.8>", "a cat ", (LoraRef("style", 0.8, 0.8),)),
        ("<lora:style>a cat", "a cat", (LoraRef("style", 1.0, 1.0),)),
        ("a <lora:a:0.5:-1> cat <lyco:b:2>", "a  cat ", (LoraRef("a", 0.5, -1.0), LoraRef("b", 2.0, 2.0))),
        ("x <lora:a:te=0.3:unet=0.7>", "x ", (LoraRef("a", 0.3, 0.7),)),
        ("x <lora:a:0.4:unet=0.1>", "x ", (LoraRef("a", 0.4, 0.1),)),
        ("x <lora:my style v2:1>", "x ", (LoraRef("my style v2", 1.0, 1.0),)),
        ("a <cat> and 3:2 odds", "a <cat> and 3:2 odds", ()),  # not a tag: no "kind:" inside the brackets
    ],
)
def test_tags_are_parsed_and_removed_as_a1111_does(prompt, text, refs):
    assert parse_prompt(prompt) == (text, refs)
    assert strip_extra_networks(prompt) == text


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("x <lora:a:strong>", "is not a number"),
        ("x <lora:a:inf>", "is not a number"),
        ("x <lora: :1>", "write <lora:NAME>"),
        ("x <lora:a:1:2:3>", "write <lora:NAME>"),
        ("x <lora:a:dyn=4>", "unknown argument dyn"),
        ("x <hypernet:h:1>", "not supported"),
    ],
)
def test_bad_tags_are_usage_errors(prompt, message):
    with pytest.raises(UsageError, match=message):
        parse_prompt(prompt)


def test_a_lora_ref_writes_the_tag_that_reads_back_to_it():
    for ref in (LoraRef("a", 0.75, 0.75), LoraRef("b c", 1.0, -0.25)):
        assert parse_prompt(ref.tag())[1] == (ref,)
    assert LoraRef("a", 0.5, 0.5).tag() == "<lora:a:0.5>"


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("style.safetensors", LoraRef("style", 1.0, 1.0, Path("style.safetensors"))),
        ("dir/style.safetensors:0.6", LoraRef("style", 0.6, 0.6, Path("dir/style.safetensors"))),
        ("C:\\loras\\x.safetensors", LoraRef("C:\\loras\\x", 1.0, 1.0, Path("C:\\loras\\x.safetensors"))),
        ("odd:name.safetensors:-1", LoraRef("odd:name", -1.0, -1.0, Path("odd:name.safetensors"))),
    ],
)
def test_lora_option_is_a_file_and_an_optional_weight(text, ref):
    assert parse_lora_option(text) == ref


@pytest.mark.parametrize("text", ["", ":0.5", "x.safetensors:nan"])
def test_bad_lora_options_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_lora_option(text)
