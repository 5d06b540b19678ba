"""Sparge attention thresholds: load once on the driver, check, hand to every worker.

The checkpoint is SpargeAttn's tuned state: a flat state dict of ``[num_heads]`` tensors, five per
DiT block::

    blocks.{i}.self_attn.inner_attention.is_sparse     bool (or 0/1) per head
    blocks.{i}.self_attn.inner_attention.cdfthreshd    float per head
    blocks.{i}.self_attn.inner_attention.simthreshd1   float per head
    blocks.{i}.self_attn.inner_attention.simthreshd2   float per head
    blocks.{i}.self_attn.inner_attention.pvthreshd     float per head

stored as ``.safetensors`` or ``.pt`` / ``.pth`` (read with ``torch.load(weights_only=True)``; no
other pickle is ever executed). Only the driver (Ray) or rank 0 (torchrun) reads the file; the
workers receive the tensors through the Ray object store or a ``torch.distributed`` broadcast, so
a worker on a node without the file still gets them. The checks here are the minimal ones (keys,
shapes, finite values); the sparge kernels' own issue adds range checks.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..errors import UserError

SPARGE_FIELDS = ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")
KEY_TEMPLATE = "blocks.{layer}.self_attn.inner_attention.{field}"
_KEY_RE = re.compile(r"^blocks\.(\d+)\.self_attn\.inner_attention\.(\w+)$")


class SpargeCheckpointError(UserError):
    """The ``sparge_ckpt`` file cannot be read or does not hold SpargeAttn thresholds for this model."""


def load_sparge_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a sparge checkpoint into CPU tensors (``.safetensors``, or ``.pt``/``.pth`` with ``weights_only=True``).

    Raises:
        SpargeCheckpointError: missing, unreadable, or not a flat ``{name: tensor}`` dict.
    """
    p = Path(path).expanduser()
    where = f"sparge_ckpt {str(path)!r}"
    if not p.is_file():
        raise SpargeCheckpointError(f"{where}: file does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, reported with its reason
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpargeCheckpointError(f"{where}: cannot be read ({type(e).__name__}: {msg})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SpargeCheckpointError(f"{where}: expected a flat state dict {{name: tensor}} (SpargeAttn's format), "
                                    f"got {type(state).__name__}")
    return dict(state)


def validate_sparge_weights(
    state: dict[str, torch.Tensor], *, path: str = "sparge_ckpt", num_layers: int | None = None,
    num_heads: int | None = None,
) -> tuple[int, int]:
    """Check the keys, shapes and values of a sparge state dict.

    Args:
        state: the loaded tensors.
        path: named in error messages.
        num_layers, num_heads: the DiT's, when known (checked against the file).

    Returns:
        ``(num_layers, num_heads)`` the file describes.

    Raises:
        SpargeCheckpointError: naming the first offending key and what would be valid.
    """
    where = f"sparge_ckpt {path!r}"
    example = KEY_TEMPLATE.format(layer=0, field="cdfthreshd")
    if not state:
        raise SpargeCheckpointError(f"{where}: holds no tensors; expected keys like {example!r}")
    layers: dict[int, set[str]] = {}
    heads: int | None = None
    for key in sorted(state):
        m = _KEY_RE.match(key)
        if m is None or m.group(2) not in SPARGE_FIELDS:
            raise SpargeCheckpointError(f"{where}: unexpected key {key!r}; expected "
                                        f"'blocks.<i>.self_attn.inner_attention.<{'|'.join(SPARGE_FIELDS)}>'")
        t = state[key]
        if t.dim() != 1 or t.numel() == 0:
            raise SpargeCheckpointError(f"{where}: {key} has shape {list(t.shape)}; expected [num_heads]")
        if heads is None:
            heads = t.numel()
        elif t.numel() != heads:
            raise SpargeCheckpointError(f"{where}: {key} has {t.numel()} heads, other keys {heads}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SpargeCheckpointError(f"{where}: {key} holds NaN or infinite values")
        layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    n = max(layers) + 1
    missing_layers = [i for i in range(n) if i not in layers]
    if missing_layers:
        raise SpargeCheckpointError(f"{where}: no thresholds for block(s) {missing_layers[:5]} (blocks 0..{n - 1} expected)")
    for i in range(n):
        lacking = [f for f in SPARGE_FIELDS if f not in layers[i]]
        if lacking:
            raise SpargeCheckpointError(f"{where}: block {i} lacks {', '.join(KEY_TEMPLATE.format(layer=i, field=f) for f in lacking)}")
    if num_layers is not None and n != num_layers:
        raise SpargeCheckpointError(f"{where}: thresholds for {n} blocks, but the DiT has {num_layers}; "
                                    "tune the checkpoint for this model")
    if num_heads is not None and heads != num_heads:
        raise SpargeCheckpointError(f"{where}: thresholds for {heads} heads per block, but the DiT has {num_heads}")
    return n, int(heads)


def sparge_checksum(state: dict[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over every key, dtype, shape and byte of ``state`` (sorted by key); ``None`` for no state."""
    if state is None:
        return None
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def make_sparge_weights(num_layers: int, num_heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random thresholds in SpargeAttn's format (tests and examples; not tuned for anything)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_layers):
        def key(f: str) -> str:
            return KEY_TEMPLATE.format(layer=i, field=f)

        state[key("is_sparse")] = torch.rand(num_heads, generator=g) > 0.3
        state[key("cdfthreshd")] = torch.rand(num_heads, generator=g) * 0.2 + 0.9
        state[key("simthreshd1")] = torch.rand(num_heads, generator=g) * 0.5 + 0.3
        state[key("simthreshd2")] = torch.rand(num_heads, generator=g)
        state[key("pvthreshd")] = torch.rand(num_heads, generator=g) * 50 + 10
    return state


def save_sparge_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` as ``.safetensors`` or ``.pt`` (by the suffix of ``path``)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    else:
        torch.save(state, str(p))
    return p


def model_dims(cfg) -> tuple[int, int] | None:
    """``(num_layers, num_heads)`` of the DiT the config names, or ``None`` when its folder cannot be read here.

    (A Ray driver on a head node without the weights checks only the file's own consistency.)
    """
    from ..models.wan import find_checkpoint
    from .pipeline import model_root

    try:
        c = find_checkpoint(model_root(cfg)).config
    except (UserError, OSError, ValueError):
        return None
    return c.num_layers, c.num_heads


def load_for_run(cfg) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The driver's step: load and validate ``cfg.sparge_ckpt`` (if set) once.

    Returns:
        ``(state or None, info)`` where ``info`` has ``path``, ``sha256``, ``layers``, ``heads``.
    """
    if cfg.sparge_ckpt is None:
        return None, {}
    state = load_sparge_weights(cfg.sparge_ckpt)
    dims = model_dims(cfg)
    layers, heads = validate_sparge_weights(state, path=cfg.sparge_ckpt, num_layers=dims[0] if dims else None,
                                            num_heads=dims[1] if dims else None)
    return state, {"path": str(cfg.sparge_ckpt), "sha256": sparge_checksum(state), "layers": layers, "heads": heads,
                   "checked_against_model": dims is not None}
