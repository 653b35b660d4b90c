"""The LoRA folder as prompts and the server's listing see it."""

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
