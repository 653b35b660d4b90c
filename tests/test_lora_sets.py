"""The LoRA folder as prompts and the server's listing see it, and the files a library keeps."""

import torch
from safetensors.torch import save_file

import sdcli.lora_sets as lora_sets
from sdcli.lora_sets import LoraLibrary, available_loras


def test_the_listing_names_the_files_a_prompt_finds_and_no_folder(tiny_checkpoint, tmp_path):
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    (loras / "folder.safetensors").mkdir()  # a folder with a LoRA's name: `find` skips it, so must the listing
    for path in (loras / "style.safetensors", loras / "sub" / "style.safetensors", loras / "sub" / "x.safetensors"):
        path.write_bytes(b"")
    library = LoraLibrary(loras, tiny_checkpoint)
    listed = available_loras(loras)
    assert listed == {"style": loras / "style.safetensors", "x": loras / "sub" / "x.safetensors"}
    assert all(library.find(name) == path for name, path in listed.items())


def test_keep_only_forgets_the_files_of_other_sets(tiny_checkpoint, tmp_path, monkeypatch):
    module = "lora_unet_input_blocks_1_1_proj_in"  # a 32-channel 1x1 convolution of the tiny UNet, kohya-named
    for name in ("a", "b"):
        factors = {"lora_down.weight": torch.ones(2, 32, 1, 1), "lora_up.weight": torch.ones(32, 2, 1, 1)}
        save_file({f"{module}.{part}": t for part, t in factors.items()}, tmp_path / f"{name}.safetensors")
    reads = []
    real_load = lora_sets.load_lora
    monkeypatch.setattr(lora_sets, "load_lora", lambda path: reads.append(path.stem) or real_load(path))
    library = LoraLibrary(tmp_path, tiny_checkpoint)
    _, only_a = library.resolve("<lora:a:1>")
    _, both = library.resolve("<lora:a:1> <lora:b:0.5>")
    library.patch(both)
    library.keep_only(only_a)
    library.patch(only_a)  # a is still held
    library.patch(both)  # b was forgotten: read again
    assert reads == ["a", "b", "b"]
