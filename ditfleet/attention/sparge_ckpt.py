"""Sparge per-layer thresholds: SpargeAttn's checkpoint format, read, checked against the model, written.

The format is SpargeAttn's tuned state (``spas_sage_attn.autotune.extract_sparse_attention_state_dict``
of a Wan model): a flat state dict of ``[num_heads]`` tensors, five per DiT block::

    blocks.{i}.self_attn.inner_attention.is_sparse     bool (or 0 / 1) per head; 0 = dense head
    blocks.{i}.self_attn.inner_attention.cdfthreshd    [0, 1]: cumulative block probability kept
    blocks.{i}.self_attn.inner_attention.simthreshd1   [-1, 1]: block self-similarity threshold
    blocks.{i}.self_attn.inner_attention.simthreshd2   finite; unused (kept for the format)
    blocks.{i}.self_attn.inner_attention.pvthreshd     finite, >= 0: PV-skip threshold (spas_sage_attn only)

Also accepted: Diffusers module names (``blocks.{i}.attn1.``), SpargeAttn's USP processor name
(``...self_attn.attn_processor.``) and the wrapper prefixes ``model.``, ``module.``,
``transformer.``, ``diffusion_model.``, ``_orig_mod.``. Layer numbers are matched exactly (block 1
is never block 10: LightX2V's loader matched names by prefix). Files: ``.safetensors``, or
``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)`` — a pickle that needs anything but
tensors and containers to load (e.g. one that carries code) is refused.

Blocks absent from the file run dense, announced by one warning that lists them. Everything else
that does not fit the model (layer or head count, a missing field, a value out of range, NaN) is
a :class:`SpargeCheckpointError` naming the file and the key.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .sparge import DEFAULT_PVTHRESHD, SpargeParams

log = logging.getLogger(__name__)

FIELDS = ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")
SUFFIXES = (".pt", ".pth", ".safetensors")
KEY_TEMPLATE = "blocks.{layer}.self_attn.inner_attention.{field}"
_KEY_RE = re.compile(
    r"^(?:(?:model|module|transformer|diffusion_model|_orig_mod)\.)*"
    r"blocks\.(?P<layer>0|[1-9][0-9]*)\.(?:self_attn|attn1)\.(?:inner_attention|attn_processor)\.(?P<field>[A-Za-z0-9_]+)$"
)
_RANGES = {  # field -> (low, high) inclusive; None: unbounded
    "cdfthreshd": (0.0, 1.0),
    "simthreshd1": (-1.0, 1.0),
    "simthreshd2": (None, None),
    "pvthreshd": (0.0, None),
}


class SpargeCheckpointError(UserError):
    """A ``sparge_ckpt`` file (or broadcast state) that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class SpargeCheckpoint:
    """Validated thresholds for a model of ``num_layers`` blocks of ``num_heads`` heads.

    Attributes:
        num_layers, num_heads: the model's.
        layers: block index -> :class:`SpargeParams`, for the blocks the file has.
        source: where it came from (named in messages).
    """

    num_layers: int
    num_heads: int
    layers: dict[int, SpargeParams] = field(default_factory=dict)
    source: str = "sparge checkpoint"

    @property
    def missing(self) -> list[int]:
        """Blocks without thresholds (they run dense)."""
        return [i for i in range(self.num_layers) if i not in self.layers]

    def params(self, layer: int) -> SpargeParams | None:
        """Block ``layer``'s settings, or ``None`` (dense)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside 0..{self.num_layers - 1}")
        return self.layers.get(layer)

    def layer_params(self) -> list[SpargeParams | None]:
        return [self.layers.get(i) for i in range(self.num_layers)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The canonical flat state dict (Wan module names, ``is_sparse`` bool, the rest float32), present blocks only."""
        out: dict[str, torch.Tensor] = {}
        for i in sorted(self.layers):
            p = self.layers[i]
            if p.cdfthreshd is None:
                raise ValueError("a top-k setting has no checkpoint form (SpargeAttn's format stores thresholds)")
            values = {"is_sparse": p.is_sparse.to(torch.bool), "cdfthreshd": p.cdfthreshd, "simthreshd1": p.simthreshd1,
                      "simthreshd2": p.simthreshd2, "pvthreshd": p.pvthreshd}
            for name in FIELDS:
                t = values[name]
                out[KEY_TEMPLATE.format(layer=i, field=name)] = (t if name == "is_sparse" else t.to(torch.float32)).clone().contiguous()
        return out

    def with_layer(self, layer: int, params: SpargeParams) -> SpargeCheckpoint:
        """A copy with block ``layer`` set (what ``sparge-tune`` adds after each block)."""
        if not 0 <= layer < self.num_layers or params.num_heads != self.num_heads:
            raise ValueError(f"layer {layer} / {params.num_heads} heads do not fit {self.num_layers} x {self.num_heads}")
        return SpargeCheckpoint(self.num_layers, self.num_heads, {**self.layers, layer: params}, self.source)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object], *, num_layers: int, num_heads: int,
                        source: str = "sparge state dict", warn_missing: bool = True, allow_empty: bool = False) -> SpargeCheckpoint:
        """Validate a flat state dict (SpargeAttn's format) against a model and convert it.

        Args:
            state: ``{key: tensor}`` as loaded (or as broadcast to a worker).
            num_layers, num_heads: the model's.
            source: the file name (or a label), named in every message.
            warn_missing: log the one warning that lists the blocks absent from ``state``.
            allow_empty: accept a state with no block at all (a ``sparge-tune`` run not yet started).

        Raises:
            SpargeCheckpointError: naming ``source`` and the offending key.
        """
        where = f"sparge_ckpt {source!r}"
        if not isinstance(state, Mapping):
            raise SpargeCheckpointError(f"{where}: expected a flat state dict {{name: tensor}} (SpargeAttn's format), "
                                        f"got {type(state).__name__}")
        if not state and not allow_empty:
            raise SpargeCheckpointError(f"{where}: holds no tensors; expected keys like "
                                        f"{KEY_TEMPLATE.format(layer=0, field='cdfthreshd')!r}")
        found: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
        unknown = []
        for key in sorted(state, key=str):
            m = _KEY_RE.match(key) if isinstance(key, str) else None
            if m is None or m.group("field") not in FIELDS:
                unknown.append(str(key))
                continue
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise SpargeCheckpointError(f"{where}: {key} is a {type(value).__name__}, expected a tensor")
            layer, name = int(m.group("layer")), m.group("field")
            slot = found.setdefault(layer, {})
            if name in slot:
                raise SpargeCheckpointError(f"{where}: block {layer} has {name} twice ({slot[name][0]} and {key}); "
                                            "keep one module naming")
            slot[name] = (key, value)
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise SpargeCheckpointError(
                f"{where}: unexpected key(s) {shown}; expected 'blocks.<i>.self_attn.inner_attention.<field>' "
                f"(or 'blocks.<i>.attn1.inner_attention.<field>') with <field> one of {', '.join(FIELDS)}")
        beyond = sorted(i for i in found if i >= num_layers)
        if beyond:
            raise SpargeCheckpointError(f"{where}: has thresholds for block(s) {beyond[:5]}, but the DiT has {num_layers} "
                                        f"blocks (0..{num_layers - 1}); the checkpoint was tuned for another model")
        layers: dict[int, SpargeParams] = {}
        for i in sorted(found):
            slot = found[i]
            lacking = [f for f in FIELDS if f not in slot]
            if lacking:
                raise SpargeCheckpointError(f"{where}: block {i} is missing key(s) "
                                            f"{', '.join(KEY_TEMPLATE.format(layer=i, field=f) for f in lacking)}")
            values = {name: _check_value(where, key, t, name, num_heads) for name, (key, t) in slot.items()}
            layers[i] = SpargeParams(is_sparse=values["is_sparse"], simthreshd1=values["simthreshd1"],
                                     cdfthreshd=values["cdfthreshd"], topk=None, pvthreshd=values["pvthreshd"],
                                     simthreshd2=values["simthreshd2"])
        ckpt = cls(int(num_layers), int(num_heads), layers, source)
        if warn_missing and ckpt.missing and layers:
            log.warning("%s: no thresholds for %d of %d blocks, which run dense: %s", where, len(ckpt.missing),
                        num_layers, _ranges(ckpt.missing))
        return ckpt


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    parts, start = [], None
    for j, i in enumerate(idx):
        if start is None:
            start = i
        if j + 1 == len(idx) or idx[j + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def _check_value(where: str, key: str, t: torch.Tensor, name: str, num_heads: int) -> torch.Tensor:
    if tuple(t.shape) != (num_heads,):
        raise SpargeCheckpointError(f"{where}: {key} has shape {list(t.shape)}, expected [{num_heads}] (one value per "
                                    f"head of the DiT's {num_heads})")
    if t.is_complex() or t.is_quantized:
        raise SpargeCheckpointError(f"{where}: {key} has dtype {t.dtype}, expected a real number type")
    t = t.detach().to("cpu")
    if name == "is_sparse":
        if t.dtype != torch.bool:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SpargeCheckpointError(f"{where}: {key} holds NaN or infinite values; expected 0 / 1 per head")
            if not bool(((t == 0) | (t == 1)).all()):
                raise SpargeCheckpointError(f"{where}: {key} = {t.tolist()}; expected 0 or 1 (or bool) per head")
        return t.to(torch.bool)
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        bad = [h for h in range(num_heads) if not math.isfinite(float(t[h]))]
        raise SpargeCheckpointError(f"{where}: {key} holds NaN or infinite values (head(s) {bad[:8]})")
    low, high = _RANGES[name]
    if (low is not None and bool((t < low).any())) or (high is not None and bool((t > high).any())):
        span = f"[{low}, {high}]" if high is not None else (f">= {low}" if low is not None else "finite")
        raise SpargeCheckpointError(f"{where}: {key} = {[round(x, 4) for x in t.tolist()]} is outside {span}")
    return t.to(torch.float32)


# ------------------------------------------------------------------------------ files
def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file's raw flat state dict (CPU tensors), without model checks.

    Raises:
        SpargeCheckpointError: missing file, wrong suffix, unreadable, a pickle that would run code,
            or not a flat ``{name: tensor}`` dict.
    """
    p = Path(path).expanduser()
    where = f"sparge_ckpt {str(path)!r}"
    if p.suffix not in SUFFIXES:
        raise SpargeCheckpointError(f"{where}: expected a {' / '.join(SUFFIXES)} file")
    if not p.is_file():
        raise SpargeCheckpointError(f"{where}: file does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        glob = next((ln for ln in lines if "GLOBAL" in ln or "global" in ln), None)
        if glob is not None:  # the pickle names a callable / class: loading it would run code
            raise SpargeCheckpointError(
                f"{where}: refused: this pickle needs more than tensors to load ({glob[:200]}); ditfleet reads .pt files "
                "with torch.load(weights_only=True) and never runs a pickle's code. A SpargeAttn checkpoint is a flat "
                "dict of tensors: re-save it as one (or as .safetensors) where its origin is trusted") from None
        raise SpargeCheckpointError(f"{where}: cannot be read: it is not a checkpoint written by torch.save, or it is "
                                    "damaged (expected SpargeAttn's flat dict of per-layer tensors, .pt or "
                                    ".safetensors)") from None
    except Exception:  # noqa: BLE001 - any reader failure means a bad file; the reader's internals are no help
        what = "a safetensors file" if p.suffix == ".safetensors" else "a checkpoint written by torch.save"
        raise SpargeCheckpointError(f"{where}: cannot be read: it is not {what}, or it is damaged (expected "
                                    "SpargeAttn's flat dict of per-layer tensors, .pt or .safetensors)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = type(state).__name__
        if isinstance(state, dict):
            bad = next(k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
            kind = f"a dict whose entry {bad!r} is a {type(state[bad]).__name__}"
        raise SpargeCheckpointError(f"{where}: expected a flat state dict {{name: tensor}} (SpargeAttn's format), got {kind}")
    return dict(state)


def load_sparge_checkpoint(path: str | os.PathLike, *, num_layers: int, num_heads: int,
                           warn_missing: bool = True, allow_empty: bool = False) -> SpargeCheckpoint:
    """Read and validate ``path`` for a DiT of ``num_layers`` blocks of ``num_heads`` heads (see the module docstring)."""
    return SpargeCheckpoint.from_state_dict(read_state(path), num_layers=num_layers, num_heads=num_heads,
                                            source=str(path), warn_missing=warn_missing, allow_empty=allow_empty)


def save_sparge_checkpoint(ckpt: SpargeCheckpoint | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``ckpt`` (or a flat state dict) in SpargeAttn's format, atomically (temporary file, then rename).

    ``.safetensors`` via safetensors; ``.pt`` / ``.pth`` via ``torch.save`` of the flat dict (loadable
    with ``weights_only=True`` and by SpargeAttn's ``load_sparse_attention_state_dict``).
    """
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise SpargeCheckpointError(f"{str(path)!r}: a Sparge checkpoint must end in {' / '.join(SUFFIXES)}")
    state = ckpt.state_dict() if isinstance(ckpt, SpargeCheckpoint) else {k: v.detach().cpu().contiguous() for k, v in ckpt.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt", "content": "sparge thresholds (SpargeAttn format)"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# ------------------------------------------------------------------------------ run-time settings
def layer_params(*, num_layers: int, num_heads: int, checkpoint: SpargeCheckpoint | None = None,
                 topk: float | None = None) -> list[SpargeParams | None]:
    """Each DiT block's Sparge settings: from the checkpoint (absent blocks: ``None`` = dense), or top-k for every block.

    Args:
        checkpoint: validated thresholds (``sparge_ckpt``); takes precedence.
        topk: ``sparge_attn_setting.topk``, the checkpoint-free mode.
    """
    if checkpoint is not None:
        if (checkpoint.num_layers, checkpoint.num_heads) != (num_layers, num_heads):
            raise SpargeCheckpointError(f"sparge_ckpt {checkpoint.source!r}: validated for {checkpoint.num_layers} x "
                                        f"{checkpoint.num_heads}, the DiT is {num_layers} x {num_heads}")
        return checkpoint.layer_params()
    if topk is None:
        raise ValueError("Sparge needs a checkpoint or topk")
    p = SpargeParams.topk_mode(num_heads, topk)
    return [p] * num_layers


def dense_layer_params(num_heads: int) -> SpargeParams:
    """Settings that make every head dense (what ``sparge-tune`` writes for a head it cannot make sparse)."""
    return SpargeParams.thresholds(num_heads, cdfthreshd=1.0, simthreshd1=1.0, is_sparse=False,
                                   pvthreshd=DEFAULT_PVTHRESHD)
