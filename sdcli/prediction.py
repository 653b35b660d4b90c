"""What a checkpoint's UNet predicts, eps (the noise) or v, for files whose shapes cannot say.

SD 2.x's 512 base (eps) and 768 model (v) have identical shapes, and fine-tunes of either (or v-prediction
fine-tunes of SDXL) say so in different ways. Decided in this order, the first that speaks wins:
1. the user's `--prediction eps|v`;
2. a marker key in the file (ComfyUI saves v-prediction models with an empty `v_pred` tensor);
3. a sidecar `NAME.yaml` beside the file with a `parameterization:` line (AUTOMATIC1111's convention, copied
   from the original `v2-inference-v.yaml`);
4. on SD 2.x text-to-image files, ComfyUI's heuristic: the standard deviation of one norm bias of the last
   output block is above 0.09 in v models (the 768 v file) and below it in eps ones (the 512 base);
5. otherwise the family's own (eps).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from sdcli.errors import UsageError
from sdcli.families import SD2, Family, with_prediction
from sdcli.header import TensorInfo

PREDICTIONS = ("eps", "v")
MARKER_KEYS = {"v_pred": "v"}
HEURISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
HEURISTIC_V_STD = 0.09
_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?(\w+)["']?\s*(#.*)?$""")


class Prediction(NamedTuple):
    """A prediction type and what decided it ("--prediction", "v_pred key", "NAME.yaml", "heuristic",
    "family")."""

    kind: str
    source: str


def sidecar_parameterization(path: Path) -> str | None:
    """The `parameterization` of the YAML config beside `path` (same name, .yaml), if it has one.

    One line is all that matters, so it is read without a YAML parser: `parameterization: "v"` at any
    indentation, quoted or not.
    """
    sidecar = path.with_suffix(".yaml")
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if m := _PARAMETERIZATION.match(line):
            return m.group(1)
    return None


def _heuristic_std(path: Path, info: TensorInfo) -> float:
    import torch

    from sdcli.checkpoint import TensorReader

    with TensorReader(path) as reader:
        bias = reader.read(info, torch.float32, "cpu")
    return torch.std(bias, unbiased=False).item()


def decide_prediction(
    path: Path, infos: dict[str, TensorInfo], family: Family, override: str | None = None
) -> Prediction:
    """The prediction type of the checkpoint at `path` (its header `infos`, its detected `family`)."""
    if override is not None:
        if override not in PREDICTIONS:
            raise UsageError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {override!r}")
        return Prediction(override, "--prediction")
    for key, kind in MARKER_KEYS.items():
        if key in infos:
            return Prediction(kind, f"{key} key")
    parameterization = sidecar_parameterization(Path(path))
    if parameterization in PREDICTIONS:
        return Prediction(parameterization, Path(path).with_suffix(".yaml").name)
    info = infos.get(HEURISTIC_KEY)
    if family.name == SD2.name and info is not None and info.end > info.start:
        return Prediction("v" if _heuristic_std(Path(path), info) > HEURISTIC_V_STD else "eps", "heuristic")
    return Prediction(family.prediction, "family")


def family_with_prediction(
    path: Path, infos: dict[str, TensorInfo], family: Family, override: str | None = None
) -> tuple[Family, Prediction]:
    """`family` with the checkpoint's prediction type decided (SD 2.x's v files become "sd2-v")."""
    prediction = decide_prediction(path, infos, family, override)
    return with_prediction(family, prediction.kind), prediction


def detect_file(path: Path, override: str | None = None) -> tuple[Family, Prediction]:
    """The family of the checkpoint at `path` from its header (and, for SD 2.x, at most one small tensor)."""
    from sdcli.families import detect
    from sdcli.header import read_header

    infos = read_header(path)
    return family_with_prediction(path, infos, detect({k: v.shape for k, v in infos.items()}), override)
