"""Sparge attention thresholds on the engine's side: load once on the driver, check, hand to every worker.

The checkpoint format and its validation live in :mod:`ditfleet.attention.sparge_ckpt` (SpargeAttn's
flat state dict of ``[num_heads]`` tensors, ``blocks.{i}.self_attn.inner_attention.{field}``; ``.pt``
read with ``torch.load(weights_only=True)`` or ``.safetensors``). Only the driver (Ray) or rank 0
(torchrun) reads the file; the workers receive the tensors through the Ray object store or a
``torch.distributed`` broadcast, so a worker on a node without the file still gets them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch

from ..attention.sparge_ckpt import (
    KEY_TEMPLATE,
    SpargeCheckpoint,
    SpargeCheckpointError,
    read_state,
    save_sparge_checkpoint,
)
from ..errors import UserError

log = logging.getLogger("ditfleet.engine")

__all__ = [
    "SpargeCheckpointError",
    "bind_sparge",
    "load_for_run",
    "load_sparge_weights",
    "make_sparge_weights",
    "model_dims",
    "save_sparge_weights",
    "sparge_checksum",
    "validate_sparge_weights",
]

_LAYER_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def load_sparge_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a sparge checkpoint into CPU tensors (see :func:`ditfleet.attention.sparge_ckpt.read_state`)."""
    return read_state(path)


def validate_sparge_weights(
    state: dict[str, torch.Tensor], *, path: str = "sparge_ckpt", num_layers: int | None = None,
    num_heads: int | None = None,
) -> tuple[int, int]:
    """Check a sparge state dict with the checkpoint module's rules.

    Args:
        state: the loaded tensors.
        path: named in error messages.
        num_layers, num_heads: the DiT's, when known; otherwise the file's own (highest block index + 1,
            length of its tensors), so a driver without the weights still checks the file's consistency.

    Returns:
        ``(num_layers, num_heads)`` it was checked against.

    Raises:
        SpargeCheckpointError: naming the file and the first offending key.
    """
    if num_layers is None:
        found = [int(m.group(1)) for k in state if isinstance(k, str) and (m := _LAYER_RE.search(k))]
        num_layers = max(found) + 1 if found else 0
    if num_heads is None:
        first = next((v for v in state.values() if isinstance(v, torch.Tensor)), None)
        num_heads = first.numel() if first is not None else 0
    SpargeCheckpoint.from_state_dict(state, num_layers=num_layers, num_heads=num_heads, source=str(path))
    return num_layers, num_heads


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
    """Random, valid thresholds in SpargeAttn's format (tests and examples; not tuned for anything)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_layers):
        def key(f: str) -> str:
            return KEY_TEMPLATE.format(layer=i, field=f)

        state[key("is_sparse")] = torch.rand(num_heads, generator=g) > 0.3
        state[key("cdfthreshd")] = torch.rand(num_heads, generator=g) * 0.1 + 0.9
        state[key("simthreshd1")] = torch.rand(num_heads, generator=g) * 0.5 + 0.3
        state[key("simthreshd2")] = torch.rand(num_heads, generator=g)
        state[key("pvthreshd")] = torch.rand(num_heads, generator=g) * 50 + 10
    return state


def save_sparge_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` as ``.safetensors`` or ``.pt`` (by the suffix of ``path``), atomically."""
    return save_sparge_checkpoint(state, path)


def model_dims(cfg) -> tuple[int, int] | None:
    """``(num_layers, num_heads)`` of the DiT the config names, or ``None`` when its folder cannot be read here.

    (A Ray driver on a head node without the weights checks only the file's own consistency.)
    """
    from ..models.wan.loader import read_config
    from .pipeline import model_root

    try:
        c = read_config(model_root(cfg))  # the config.json alone (the weights may be a pre-quantised file's)
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


def bind_sparge(dit, cfg, state: dict[str, torch.Tensor] | None, *, read_file: bool = True) -> str | None:
    """Give a Sparge self-attention kernel of ``dit`` its per-block settings (start-up, every rank, every expert):
    a new :class:`~ditfleet.models.attention_policy.SelfAttentionPolicy` with the kernel bound per block.

    Settings come from ``state`` (the thresholds the driver loaded and broadcast), else from
    ``cfg.sparge_ckpt`` read here (``read_file``: one process that owns its config, never an engine
    worker), else from ``cfg.sparge_attn_setting.topk`` for every block. Nothing happens when the
    self-attention kernel is not Sparge.

    Returns:
        The start-up line that says what was bound (logged), or ``None``.

    Raises:
        SpargeCheckpointError: the thresholds do not fit the DiT (blocks, heads, values).
        RuntimeError: an engine worker (``read_file=False``) was given no thresholds for a ``sparge_ckpt`` run.
    """
    from ..models.attention_policy import build_policy

    policy = getattr(dit, "policy", None)
    if policy is None or policy.kind != "sparge":
        return None
    source = str(cfg.sparge_ckpt) if cfg.sparge_ckpt is not None else "sparge thresholds"
    if state is None and cfg.sparge_ckpt is not None:
        if not read_file:
            raise RuntimeError(f"sparge_ckpt {cfg.sparge_ckpt!r}: this worker received no thresholds from the driver")
        state = load_sparge_weights(cfg.sparge_ckpt)
    c = dit.config
    policy = build_policy(policy.kernel, num_layers=c.num_layers, num_heads=c.num_heads, radial=policy.radial,
                          sparge_state=state, sparge_topk=None if state is not None else cfg.sparge_attn_setting.topk,
                          source=source)
    dit.set_policy(policy)
    line = policy.describe() + (f" from {source}" if state is not None else "")
    log.info(line)
    return line
