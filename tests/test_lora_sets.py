"""The LoRA folder as prompts and the server's listing see it, and the files a library keeps."""

import os

import torch
from safetensors.torch import save_file

import sdcli.lora_sets as lora_sets
from sdcli.checkpoint import load_model
from sdcli.lora_sets import ActiveLoras, LoraLibrary, available_loras, lora_hash

MODULE = "lora_unet_input_blocks_1_1_proj_in"  # a 32-channel 1x1 convolution of the tiny UNet, kohya-named
WEIGHT = "input_blocks.1.1.proj_in.weight"


def write_lora(path, value: float = 1.0) -> None:
    """A rank-2 LoRA of MODULE whose factors are all `value`."""
    factors = {"lora_down.weight": torch.full((2, 32, 1, 1), value), "lora_up.weight": torch.full((32, 2, 1, 1), value)}
    save_file({f"{MODULE}.{part}": t for part, t in factors.items()}, path)


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
    for name in ("a", "b"):
        write_lora(tmp_path / f"{name}.safetensors")
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


def test_a_lora_file_replaced_on_disk_is_read_again_even_for_the_same_set(tiny_checkpoint, tmp_path):
    # A server keeps its model, and the set of the last request in its weights: a LoRA retrained into the same
    # file must not go on being the old one (A1111 reloads a LoRA whose file is newer).
    path = tmp_path / "a.safetensors"
    write_lora(path, 1.0)
    library = LoraLibrary(tmp_path, tiny_checkpoint)
    _, loras = library.resolve("<lora:a:1>")
    model = load_model(tiny_checkpoint, dtype=torch.float32, patch=library.patch(loras))
    active = ActiveLoras(library, model, loras)
    old_hash, stat = lora_hash(path), path.stat()
    write_lora(path, 2.0)  # the same size: told apart by the time it was written
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    active.use(loras)
    fresh = load_model(tiny_checkpoint, dtype=torch.float32, patch=LoraLibrary(tmp_path, tiny_checkpoint).patch(loras))
    assert torch.equal(model.unet.get_parameter(WEIGHT), fresh.unet.get_parameter(WEIGHT))
    assert lora_hash(path) != old_hash
