"""Generate sdcli/data/vocab.json and sdcli/data/merges.txt from OpenAI's CLIP BPE merges file.

The CLIP tokenizer's vocabulary is not stored anywhere as such: OpenAI ship only the list of BPE merges
(`bpe_simple_vocab_16e6.txt.gz`) and build the vocabulary from it at start-up (`SimpleTokenizer` in
openai/CLIP and open_clip). This script runs the same recipe once and writes the two files in the
format Hugging Face's `CLIPTokenizer(vocab_file=..., merges_file=...)` reads, so that sdcli can ship
them inside the package and never touch the network to tokenize a prompt.

Usage:
    python scripts/make_clip_vocab.py [PATH/TO/bpe_simple_vocab_16e6.txt.gz] [--out-dir DIR]

With no path, the open_clip_torch wheel (which carries the .gz) is fetched with `pip download`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "sdcli" / "data"

# OpenAI's own slice of the merges file (`merges[1 : 49152-256-2+1]`); with it the vocabulary is
# 256 bytes + 256 bytes with '</w>' + 48894 merges + 2 special tokens = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2 and CLIP do.

    Printable latin-1 bytes map to themselves; the rest are shifted to code points from 256 upwards, so
    BPE never has to handle whitespace or control characters. The order of the dict defines the first
    256 vocabulary ids, so it must match OpenAI's exactly.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's token->id vocabulary and its ordered merge list from the merges file's text.

    Follows open_clip's `SimpleTokenizer.__init__`: the first line is a header, the next 48894 lines
    are merges in rank order, and ids are positions in bytes + bytes-with-'</w>' + merges + specials.
    """
    lines = bpe_text.split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"expected {NUM_MERGES} merge lines of two symbols each after the header")
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # A duplicate token would silently shift every later id; OpenAI's list has none.
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def fetch_bpe_gz(tmp_dir: Path) -> Path:
    """Download the open_clip_torch wheel with pip and extract the CLIP merges file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", OPEN_CLIP_WHEEL, "-d", str(tmp_dir)],
        check=True,
    )
    wheels = sorted(tmp_dir.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {tmp_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        target = tmp_dir / Path(WHEEL_MEMBER).name
        target.write_bytes(wheel.read(WHEEL_MEMBER))
    return target


def write_tokenizer_files(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (Hugging Face CLIP layout) into `out_dir`; return their paths."""
    bpe_text = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8")
    vocab, merges = build_vocab_and_merges(bpe_text)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    # Compact, id-ordered and unescaped, like the vocab.json in openai/clip-vit-large-patch14.
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    # The '#version' header is what Hugging Face's loaders skip as line 0.
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", nargs="?", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bpe_gz = args.bpe_gz if args.bpe_gz is not None else fetch_bpe_gz(Path(tmp))
        paths = write_tokenizer_files(bpe_gz, args.out_dir)
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
