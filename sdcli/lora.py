"""LoRA and LyCORIS files: read them, match their modules to a checkpoint's weights, merge them while loading.

Formats, told apart by their tensor names (one file may mix them):
- kohya-ss sd-scripts / LyCORIS: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (LoCon: a 3x3 down and a 1x1 up on convolutions; Tucker LoCon adds `.lora_mid.weight`); LoHa
  `.hada_w1_a/_b`, `.hada_w2_a/_b`; LoKr `.lokr_w1` (or `_a/_b`), `.lokr_w2` (or `_a/_b`); Tucker cores
  `.hada_t1/_t2`, `.lokr_t2` on convolutions;
- diffusers / PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight` (or diffusers' `.lora.down.weight`,
  `.lora_linear_layer.down.weight`, `.processor.to_q_lora.down.weight`), alpha from a `<module>.alpha`
  tensor or from PEFT's config in the file's `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`,
  `use_rslora`); scale 1 when the file gives none. PEFT's DoRA adds `.lora_magnitude_vector` (`use_dora`).

A module's change is a matrix (out, in * kernel) built from its factors and scaled by alpha / rank:
LoRA up @ down, LoHa (w1_a @ w1_b) * (w2_a @ w2_b), LoKr kron(w1, w2). `LoraPatch` adds the weighted
changes of every LoRA to a weight in fp32 as it is loaded, so a merged model costs nothing per step.
DoRA then scales each output row of W + w * change to its learnt magnitude, as peft merges it:
W' = m * (W + w dW) / ||W + w dW||, the norm taken per output row (over inputs and kernel).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcli.convert import lora_aliases, lora_targets
from sdcli.errors import LoraError
from sdcli.families import Family, detect
from sdcli.header import read_header

# Tensor name ending -> (kind of module, the tensor's role in it).
PARTS: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "lora_magnitude_vector": ("lora", "magnitude"),  # PEFT's DoRA
    "lora.down.weight": ("lora", "down"),  # diffusers' own spelling, as its training scripts save
    "lora.up.weight": ("lora", "up"),
    "lora_linear_layer.down.weight": ("lora", "down"),
    "lora_linear_layer.up.weight": ("lora", "up"),
    **{f"hada_{role}": ("loha", role) for role in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{role}": ("lokr", role) for role in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "alpha": (None, "alpha"),
}
# diffusers' attention-processor files (2023) name the projection after the processor: renamed to the module.
LEGACY_NAMES = (
    (re.compile(r"\.processor\.to_(q|k|v)_lora\.(down|up)\.weight$"), r".to_\1.lora.\2.weight"),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora.\1.weight"),
    (re.compile(r"\.self_attn\.to_(q|k|v|out)_lora\.(down|up)\.weight$"), r".self_attn.\1_proj.lora.\2.weight"),
)
# Parts of forms whose merge we do not implement: refused by name rather than merged wrongly. LyCORIS' DoRA
# (`dora_scale`, its axis chosen by the trainer) has no reference here: diffusers drops those tensors.
UNSUPPORTED = {
    "dora_scale": "LyCORIS DoRA (dora_scale)",
    "lokr_t1": "LoKr with a Tucker-decomposed first factor",
}
# The factors a complete module of each kind has: for each factor, one of its alternative tensor sets.
REQUIRED = {
    "lora": (({"down", "up"},),),
    "loha": (({"w1_a", "w1_b"},), ({"w2_a", "w2_b"},)),
    "lokr": (({"w1"}, {"w1_a", "w1_b"}), ({"w2"}, {"w2_a", "w2_b"})),
}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
ADAPTER_METADATA = "lora_adapter_metadata"  # where diffusers stores PEFT's LoraConfig, per network prefix


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its kind ("lora", "loha", "lokr"), its factors by role, and its alpha (None: scale 1)."""

    kind: str
    factors: Mapping[str, torch.Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; LoKr has one only where a factor is itself low-rank (w2's first)."""
        f = self.factors
        if self.kind == "lora":
            return f["down"].shape[0]
        if self.kind == "loha":
            return f["w1_b"].shape[0]
        return f["w2_b"].shape[0] if "w2_b" in f else f["w1_b"].shape[0] if "w1_b" in f else None

    @property
    def magnitude(self) -> torch.Tensor | None:
        """DoRA's magnitude per output row, or None for a plain LoRA."""
        return self.factors.get("magnitude")

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def delta_shape(self) -> tuple[int, int]:
        """(out, in * kernel) of the change; ValueError if the factors do not fit together."""
        s = {role: tuple(t.shape) for role, t in self.factors.items()}
        if self.kind == "lora":
            if "mid" in s:  # up (o, r1, 1, 1) . mid (r1, r2, kh, kw) . down (r2, i, 1, 1)
                up, mid, down = s["up"], s["mid"], s["down"]
                if math.prod(up[1:]) != mid[0] or mid[1] != down[0] or math.prod(down[2:]) != 1:
                    raise ValueError(f"{up} x {mid} x {down}")
                return up[0], down[1] * math.prod(mid[2:])
            shape = _product_shape(s["up"], s["down"])
            if "magnitude" in s and math.prod(s["magnitude"]) != shape[0]:
                raise ValueError(f"magnitude {s['magnitude']} for {shape[0]} outputs")
            return shape
        if self.kind == "loha":
            first, second = _factor_shape(s, "1"), _factor_shape(s, "2")
            if first != second:
                raise ValueError(f"{first} vs {second}")
            return first
        w1 = s["w1"][:2] if "w1" in s else _factor_shape(s, "1")
        w2 = (s["w2"][0], math.prod(s["w2"][1:])) if "w2" in s else _factor_shape(s, "2")
        return w1[0] * w2[0], w1[1] * w2[1]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The change to the weight, (out, in * kernel) in fp32, scaled by alpha / rank."""
        return self._product(device) * self.scale

    def add_to(self, weight: torch.Tensor, alpha: float) -> None:
        """weight (out, in * kernel, fp32) += alpha * the change, without a full-size temporary for a plain LoRA."""
        if self.kind == "lora" and "mid" not in self.factors:
            up, down = (self.factors[role].to(weight.device, torch.float32).flatten(1) for role in ("up", "down"))
            weight.addmm_(up, down, alpha=alpha * self.scale)
        else:
            weight.add_(self._product(weight.device), alpha=alpha * self.scale)

    def _product(self, device: torch.device | str) -> torch.Tensor:
        """The factors' product, (out, in * kernel) in fp32, unscaled."""
        f = {role: t.to(device, torch.float32) for role, t in self.factors.items() if role != "magnitude"}
        if self.kind == "lora":
            if "mid" in f:  # Tucker LoCon: 1x1 down, kh x kw mid, 1x1 up composed into one kh x kw kernel
                delta = torch.einsum("or,rshw,si->oihw", f["up"].flatten(1), f["mid"], f["down"].flatten(1))
            else:
                delta = f["up"].flatten(1) @ f["down"].flatten(1)
        elif self.kind == "loha":
            delta = _factor(f, "1") * _factor(f, "2")  # Hadamard product of two low-rank matrices
        else:
            w1 = f["w1"] if "w1" in f else _factor(f, "1")
            w2 = f["w2"] if "w2" in f else _factor(f, "2")
            delta = torch.kron(w1, w2.flatten(1))  # w2 flattened over (in, kh, kw): the 4-D kron's numbers
        return delta.flatten(1)


def _product_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    if math.prod(a[1:]) != b[0]:
        raise ValueError(f"{a} x {b}")
    return a[0], math.prod(b[1:])


def _factor_shape(s: Mapping[str, tuple[int, ...]], i: str) -> tuple[int, int]:
    """Shape of LyCORIS factor `i` ("1" or "2"): w_a @ w_b, or with a Tucker core t (r, r, kh, kw), w_a and w_b
    are (r, out) and (r, in)."""
    a, b = s[f"w{i}_a"], s[f"w{i}_b"]
    if f"t{i}" not in s:
        return _product_shape(a, b)
    t = s[f"t{i}"]
    if t[:2] != (a[0], b[0]):
        raise ValueError(f"core {t} with {a} and {b}")
    return a[1], b[1] * math.prod(t[2:])


def _factor(f: Mapping[str, torch.Tensor], i: str) -> torch.Tensor:
    """LyCORIS factor `i`: w_a @ w_b (flattened over the kernel), or the Tucker form t x1 w_a x2 w_b."""
    a, b = f[f"w{i}_a"], f[f"w{i}_b"]
    if f"t{i}" in f:
        return torch.einsum("ijkl,ip,jr->prkl", f[f"t{i}"], a, b).flatten(1)  # (out, in * kh * kw)
    return a.flatten(1) @ b.flatten(1)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file's modules, by the names the file gives them."""

    path: Path
    modules: Mapping[str, LoraModule]
    unknown: tuple[str, ...]  # tensors that are part of no LoRA module we know

    @property
    def name(self) -> str:
        return self.path.stem


def load_lora(path: str | Path) -> LoadedLora:
    """Read a LoRA / LyCORIS .safetensors file and group its tensors by module.

    Pickles (.pt, .ckpt, .bin) are refused as for checkpoints. Forms we cannot merge (LyCORIS DoRA) and
    modules missing a factor are errors that name the tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    read_header(path)  # refuses pickles, non-safetensors and truncated files with the checkpoint messages
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unsupported = [k for k in tensors if any(part in k for part in UNSUPPORTED)]
    if unsupported:
        kinds = sorted({UNSUPPORTED[p] for k in unsupported for p in UNSUPPORTED if p in k})
        raise LoraError(
            f"{path}: {' and '.join(kinds)} LoRAs are not supported yet ({_some(unsupported)}); "
            "use a plain LoRA, LoCon, LoHa, LoKr or diffusers/PEFT DoRA file"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    unknown = []
    for key, tensor in tensors.items():
        for pattern, replacement in LEGACY_NAMES:
            key = pattern.sub(replacement, key)
        found = next(((key[: -len(s) - 1], s) for s in PARTS if key.endswith("." + s)), None)
        if found is None:
            unknown.append(key)
            continue
        module, suffix = found
        kind, role = PARTS[suffix]
        grouped.setdefault(module, {})[role] = tensor
        if kind:
            kinds.setdefault(module, set()).add(kind)
    config = _peft_config(path, metadata)
    alphas = _peft_alphas(config)
    modules = {}
    for module, parts in grouped.items():
        kind = kinds.get(module, set())
        if len(kind) != 1:
            what = "only an alpha" if not kind else f"parts of {' and '.join(sorted(kind))}"
            raise LoraError(f"{path}: module '{module}' has {what}; the file is damaged or in a form sdcli cannot read")
        (kind,) = kind
        alpha = parts.pop("alpha", None)
        modules[module] = _module(path, module, kind, parts, alpha, alphas)
        if config.get(f"{module.partition('.')[0]}.use_dora") and "magnitude" not in parts:
            raise LoraError(f"{path}: its metadata says DoRA (use_dora) but '{module}' has no lora_magnitude_vector")
    if not modules:
        raise LoraError(f"{path}: no LoRA tensors found (no '.lora_down.weight', '.lora_A.weight', 'hada_', 'lokr_')")
    return LoadedLora(path, modules, tuple(unknown))


def _module(path: Path, module: str, kind: str, parts: dict, alpha: torch.Tensor | None, alphas) -> LoraModule:
    if not all(any(option <= parts.keys() for option in factor) for factor in REQUIRED[kind]):
        raise LoraError(f"{path}: module '{module}' is missing tensors (has {', '.join(sorted(parts))})")
    # Every factor is a matrix or a kernel (DoRA's magnitude, a vector, aside): checked here, as the shape
    # checks below index their dimensions and a rank of 0 would divide alpha by 0.
    flat = sorted(role for role, t in parts.items() if role != "magnitude" and (t.ndim < 2 or t.numel() == 0))
    if flat:
        raise LoraError(f"{path}: module '{module}' has empty or one-dimensional factors ({', '.join(flat)})")
    lora = LoraModule(kind, parts, None if alpha is None else float(alpha.float().reshape(-1)[0]))
    if alpha is None and kind == "lora":
        lora = LoraModule(kind, parts, alphas(module, lora.rank))
    try:
        lora.delta_shape()
    except ValueError as e:
        raise LoraError(f"{path}: module '{module}' has factors that do not fit together ({e})") from None
    return lora


def _peft_config(path: Path, metadata: Mapping[str, str]) -> dict:
    """PEFT's LoraConfig per network as diffusers stores it (`unet.lora_alpha`, ...); empty if the file has none."""
    try:
        return json.loads(metadata[ADAPTER_METADATA]) if ADAPTER_METADATA in metadata else {}
    except json.JSONDecodeError:
        raise LoraError(f"{path}: unreadable '{ADAPTER_METADATA}' metadata") from None


def _peft_alphas(config: Mapping):
    """A function (module, rank) -> alpha from PEFT's config stored by diffusers, or None where it gives none."""

    def alpha(module: str, rank: int) -> float | None:
        network, _, name = module.partition(".")
        value = config.get(f"{network}.lora_alpha")
        # PEFT's alpha_pattern: a regex matching the module's name or its end after a dot.
        for pattern, pattern_alpha in (config.get(f"{network}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                value = pattern_alpha
                break
        if value is None:
            return None
        # rsLoRA scales by alpha / sqrt(rank): the same as an alpha of alpha * sqrt(rank) over rank.
        return float(value) * (math.sqrt(rank) if config.get(f"{network}.use_rslora") else 1.0)

    return alpha


def _some(names: Sequence[str], count: int = 4) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(f"'{n}'" for n in names[:count]) + more


class LoraPatch:
    """The loading hook for a set of LoRAs: a touched weight becomes W + sum of weighted changes.

    Call it with (checkpoint key, tensor): the sum is computed and returned in fp32 (the loader casts it
    to the model's dtype, once); a key no LoRA touches returns the same tensor object. Each term is
    (module, weight, rows): `rows` (i, n) adds the change to the i-th of n blocks of rows only (q, k or v of
    a fused projection).
    Terms apply in order; a DoRA term rescales the rows it changes as merged so far.
    `keys` are the keys it changes, so a prompt file that switches LoRA sets reloads only `old.keys | new.keys`.
    """

    def __init__(self, terms: Mapping[str, Sequence[tuple[LoraModule, float, tuple[int, int] | None]]]):
        self.terms = {key: tuple(t) for key, t in terms.items() if t}

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.terms)

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        terms = self.terms.get(key)
        if not terms:
            return tensor
        # A contiguous fp32 copy: the file's tensor is never written to, whatever its dtype or layout.
        merged = tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        flat = merged.view(merged.shape[0], -1)
        for module, weight, rows in terms:
            block = flat if rows is None else flat.chunk(rows[1])[rows[0]]
            module.add_to(block, weight)
            if module.magnitude is not None:  # DoRA: each output row scaled to its learnt magnitude
                magnitude = module.magnitude.to(merged.device, torch.float32).reshape(-1, 1)
                block.mul_(magnitude / block.norm(dim=1, keepdim=True))
        return merged  # cast once, by the loader, to the model's dtype: no rounding through the file's


def lora_patch(
    loras: Sequence[tuple[LoadedLora, float, float]],
    family: Family,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    ignore_unknown: bool = False,
) -> LoraPatch:
    """The patch hook merging `loras`, each given as (lora, text-encoder weight, UNet weight), into a checkpoint.

    The text-encoder weight applies to every text encoder. `shapes` maps the checkpoint's keys to shapes
    (its safetensors header). Raises LoraError, naming the file, for modules that match no weight of the
    model (unless `ignore_unknown`) and for changes whose shape differs from the weight's (a LoRA for
    another model family).
    """
    aliases = lora_aliases(lora_targets(family), shapes)
    terms: dict[str, list[tuple[LoraModule, float, tuple[int, int] | None]]] = {}
    for lora, weight_te, weight_unet in loras:
        unknown = list(lora.unknown) + [m for m in lora.modules if m not in aliases]
        if unknown and not ignore_unknown:
            hint = " (it looks like an SDXL LoRA)" if any(m.startswith(SDXL_PREFIXES) for m in unknown) else ""
            raise LoraError(
                f"{lora.path}: {len(unknown)} tensors or modules match nothing in this {family.name} model"
                f"{hint}: {_some(unknown)}; use a LoRA made for this model, or --lora-ignore-unknown to skip them"
            )
        for name, module in lora.modules.items():
            if name not in aliases:
                continue
            target, key, rows = aliases[name]
            shape = shapes[key]
            height = shape[0] // (rows[1] if rows else 1)
            if module.delta_shape() != (height, math.prod(shape[1:])):
                start = rows[0] * height if rows else 0
                part = f" (its rows {start}:{start + height})" if rows else ""
                raise LoraError(
                    f"{lora.path}: module '{name}' changes a {module.delta_shape()} matrix but '{key}' is "
                    f"{tuple(shape)}{part}: this LoRA is for another model; use one made for {family.name}"
                )
            weight = weight_unet if target.network == "unet" else weight_te
            if weight:
                terms.setdefault(key, []).append((module, weight, rows))
    return LoraPatch(terms)


def checkpoint_lora_patch(
    checkpoint: str | Path, loras: Sequence[tuple[LoadedLora, float, float]], *, ignore_unknown: bool = False
) -> LoraPatch:
    """`lora_patch` for a checkpoint file: its family and shapes come from its header (no tensor is read)."""
    shapes = {key: info.shape for key, info in read_header(checkpoint).items()}
    return lora_patch(loras, detect(shapes), shapes, ignore_unknown=ignore_unknown)
