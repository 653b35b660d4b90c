"""Where images go: `--output`, or `--outdir` with a `--name` template, and a prompt file's own names kept
inside that folder; checked (fields, lengths, writable folder) before anything is generated."""

from __future__ import annotations

import re
import string
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from sdcli.errors import SdcliError, UsageError
from sdcli.request import GenerationRequest
from sdcli.sampler_names import resolve_sampler

DEFAULT_OUTDIR = Path("outputs")
DEFAULT_NAME = "{index:05d}-{seed}"
NAME_FIELDS = ("index", "seed", "prompt", "sampler", "steps", "cfg", "width", "height", "model", "date", "time")
MAX_NAME_BYTES = 255  # what ext4, APFS and NTFS allow for one file name
MAX_PROMPT_IN_NAME = 120  # bytes of the prompt's slug in a name, so a long prompt still gives a legal name
_LEADING_NUMBER = re.compile(r"^(\d+)-")
# Python's format spec without nested fields: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[+\- ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def next_index(outdir: Path) -> int:
    """The number after the highest `NNNNN-` prefix in `outdir`, so names keep counting across runs."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _LEADING_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def slug(text: str) -> str:
    """A prompt made safe as part of a file name: word characters kept, every other run of characters '-'."""
    return re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_") or "untitled"


def _cut(text: str, max_bytes: int) -> str:
    """`text` shortened to at most `max_bytes` of UTF-8, never splitting a character."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def _shown(text: str, limit: int = 60) -> str:
    """A user's text as quoted in a message: whole when short, cut otherwise, so an error stays one line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_name_template(template: str) -> None:
    """Refuse a --name template that is more than the documented fields with simple format specs.

    No attribute or index access (`{seed.__class__}`), no conversions, no nested fields, widths and
    precisions of at most 255, so a template can neither reach into objects nor build a giant name.
    """
    fields = ", ".join(NAME_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"bad --name template {_shown(template)} ({e}); fields: {fields}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in NAME_FIELDS:
            raise UsageError(f"unknown field {_shown(name)} in --name {_shown(template)}; fields: {fields}")
        match = _FORMAT_SPEC.fullmatch(spec or "")
        too_wide = match is not None and any(int(match.group(g) or 0) > MAX_NAME_BYTES for g in ("width", "precision"))
        if conversion is not None or match is None or too_wide:
            raise UsageError(
                f"--name {_shown(template)}: {{{name}}} takes only a simple format such as {{index:05d}} or "
                f"{{prompt:.40}} (widths up to {MAX_NAME_BYTES}); fields: {fields}"
            )


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


def ensure_writable(folders: Iterable[Path]) -> None:
    """Create each output folder and check a file can be made in it, before any time goes into generating."""
    for folder in dict.fromkeys(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".sdcli-check-"):
                pass
        except OSError as e:
            raise SdcliError(
                f"cannot write into {folder}: {e.strerror or e}; choose another --outdir or --output, "
                "or fix the folder's permissions"
            ) from None


def numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}-{number:04d}{path.suffix}")


class Namer:
    """Target paths: `--output` (numbered when a run makes several images) or `--outdir` with a template.

    Template fields: index (the image's place in the run, counting on from `start`: by default the number
    after the highest already in the folder), seed, prompt (a file-name-safe slug), sampler, steps, cfg,
    width, height, model, date, time.
    """

    def __init__(
        self,
        output: Path | None,
        outdir: Path | None,
        template: str | None,
        model_name: str,
        overwrite: bool = False,
        start: int | None = None,
    ) -> None:
        if output is not None and (outdir is not None or template is not None):
            raise UsageError("give either --output or --outdir/--name, not both")
        if output is not None and output.suffix.lower() != ".png":
            raise UsageError(f"--output must name a .png file, got {output}")
        self.output = output
        self.outdir = outdir or DEFAULT_OUTDIR
        self.template = template or DEFAULT_NAME
        self.model_name = model_name
        self.overwrite = overwrite
        self.now = datetime.now()
        if start is None:
            start = next_index(self.outdir) if output is None else 0
        self.start = start
        check_name_template(self.template)
        self._render(0, GenerationRequest("prompt"))  # a bad template fails before anything runs

    @property
    def folder(self) -> Path:
        """Where a prompt file's own output names must stay: --outdir, or the folder of --output."""
        return self.output.parent if self.output is not None else self.outdir

    def _render(self, index: int, request: GenerationRequest) -> str:
        fields = {
            "index": index, "seed": request.seed, "prompt": _cut(slug(request.prompt), MAX_PROMPT_IN_NAME),
            "sampler": resolve_sampler(request.sampler).name, "steps": request.steps, "cfg": request.cfg,
            "width": request.width, "height": request.height, "model": self.model_name,
            "date": self.now.strftime("%Y-%m-%d"), "time": self.now.strftime("%H%M%S"),
        }  # fmt: skip
        try:
            name = self.template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(
                f"bad --name template {_shown(self.template)} ({e}); fields: {', '.join(NAME_FIELDS)}"
            ) from None
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UsageError(f"--name {_shown(self.template)} must give a plain file name, got {_shown(name)}")
        name = name if name.lower().endswith(".png") else name + ".png"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise UsageError(
                f"--name {_shown(self.template)} gives a file name of {len(name.encode())} bytes, more than the "
                f"{MAX_NAME_BYTES} a file system allows: shorten it (e.g. {{prompt:.40}})"
            )
        return name

    def paths(self, requests: list[GenerationRequest], job_output: str | None, total: int, done: int) -> list[Path]:
        """Targets for one job's images; `done` images of the run's `total` came before them.

        Raises UsageError for a job's own output name that leaves the output folder, is not a .png, or
        would replace a file that is not a PNG image.
        """
        if job_output is not None:
            base = self._job_output(job_output)
            targets = [base] if len(requests) == 1 else [numbered(base, i + 1) for i in range(len(requests))]
        elif self.output is not None:
            targets = (
                [self.output] if total == 1 else [numbered(self.output, done + i + 1) for i in range(len(requests))]
            )
        else:
            targets = [self.outdir / self._render(self.start + done + i, r) for i, r in enumerate(requests)]
        if self.overwrite:
            for target in targets:
                if target.exists() and not _is_png(target):
                    raise UsageError(f"{target} exists and is not a PNG image: sdcli does not replace it")
        return targets

    def _job_output(self, job_output: str) -> Path:
        """A prompt file's "output", relative to the output folder, kept inside it."""
        target = self.folder / job_output
        shown = _shown(job_output)
        if target.suffix.lower() != ".png":
            raise UsageError(f'"output" must name a .png file, got {shown}')
        root = self.folder.resolve()
        resolved = target.resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise UsageError(
                f'"output" {shown} is outside {self.folder}: a prompt file names files inside --outdir '
                "(or the folder of --output) only"
            )
        return target
