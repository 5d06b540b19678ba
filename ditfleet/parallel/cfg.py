"""Classifier-free guidance over the mesh's cfg axis.

With ``cfg_size == 2`` cfg rank 0 runs the conditional branch and cfg rank 1 the unconditional
one (each over its own SP group); one all-gather over the cfg group then gives every rank both
predictions, so the sampler step stays identical everywhere. With ``cfg_size == 1`` both
branches run on every rank (as a batch of two, or one after the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .mesh import ParallelMesh
from .shard import all_gather_single
from .transport import bounded, peer_wait

COND, UNCOND = 0, 1


def cfg_branch(mesh: ParallelMesh) -> int | None:
    """Which branch this rank runs: ``COND`` (0), ``UNCOND`` (1), or ``None`` for both (cfg_size 1)."""
    return mesh.cfg_rank if mesh.cfg_size == 2 else None


def cfg_select(cond: torch.Tensor, uncond: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """The input this rank feeds the model.

    Args:
        cond: ``[B, ...]`` conditional input (e.g. text context), any dtype.
        uncond: ``[B, ...]`` unconditional input, same shape and dtype.
        mesh: the parallel mesh.

    Returns:
        ``cond`` or ``uncond`` (``[B, ...]``) under cfg parallelism, else both as one batch
        ``[2B, ...]`` (conditional first).
    """
    branch = cfg_branch(mesh)
    if branch is None:
        return torch.cat((cond, uncond), dim=0)
    return cond if branch == COND else uncond


def cfg_exchange(pred: torch.Tensor, mesh: ParallelMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches' predictions on every rank.

    Args:
        pred: this rank's prediction: ``[B, ...]`` for its branch under cfg parallelism, or the
            ``[2B, ...]`` batch of both (conditional first) when ``cfg_size == 1``.
        mesh: the parallel mesh.

    Returns:
        ``(pred_cond, pred_uncond)``, each ``[B, ...]`` in ``pred``'s dtype.
    """
    if mesh.cfg_size == 1:
        cond, uncond = pred.chunk(2, dim=0)
        return cond, uncond
    pred = pred.contiguous()
    both = pred.new_empty((2, *pred.shape))
    with peer_wait("cfg exchange", mesh.peers("cfg"), mesh.timeout_s):
        bounded(all_gather_single(both, pred.unsqueeze(0), group=mesh.group("cfg"), async_op=True), pred, mesh.timeout_s)
    return both[COND], both[UNCOND]


def cfg_predict(
    fn: Callable[..., torch.Tensor], cond_kwargs: dict[str, Any], uncond_kwargs: dict[str, Any], mesh: ParallelMesh
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model for both branches (one per cfg rank, or both here) and exchange the predictions.

    Args:
        fn: the model call; returns a tensor of the same shape for either branch.
        cond_kwargs: keyword arguments of the conditional call.
        uncond_kwargs: keyword arguments of the unconditional call.
        mesh: the parallel mesh.

    Returns:
        ``(pred_cond, pred_uncond)`` on every rank.
    """
    branch = cfg_branch(mesh)
    if branch is None:
        return fn(**cond_kwargs), fn(**uncond_kwargs)
    return cfg_exchange(fn(**(cond_kwargs if branch == COND else uncond_kwargs)), mesh)


def cfg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` computed in float32, returned in ``pred_cond``'s dtype.

    Args:
        pred_cond: ``[B, ...]`` conditional prediction.
        pred_uncond: ``[B, ...]`` unconditional prediction, same shape.
        guidance_scale: the CFG scale.
    """
    c, u = pred_cond.float(), pred_uncond.float()
    return (u + guidance_scale * (c - u)).to(pred_cond.dtype)
