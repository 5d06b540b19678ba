"""Which kernel and which block mask each self-attention layer runs at each denoising step.

A :class:`SelfAttentionPolicy` is built once at start-up (:func:`build_policy`, from the run's resolved
self-attention kernel, its ``radial_attn_setting`` and its Sparge per-layer settings) and handed to a
DiT (``dit.set_policy(policy)``); the DiT's blocks only ask it (:meth:`SelfAttentionPolicy.plan`).
Nothing here knows a model: a layer is an index, a step is an index, and the token grid is
``(frames, h, w)`` with tokens frame-major (``tokens_per_frame = h * w``).

Kinds, from the kernel:

- ``dense``: the kernel, no mask, every layer and step.
- ``radial`` (a kernel with ``caps.block_mask``): the radial mask of the grid
  (:func:`~ditfleet.attention.radial.radial_mask_for`, cached, one object shared by every radial
  layer), except while ``step < dense_timesteps`` or ``layer < dense_layers`` (the reference's
  ``dense_timestep`` / ``dense_block``): there the ``dense_fallback`` kernel, or else the radial
  kernel without a mask (its own dense kernel). A radial kernel without a setting, or
  ``dense_timesteps > 0`` without a step index, is an error: nothing silently runs dense.
- ``sparge`` (a ``per_layer`` kernel): layer ``i`` runs the kernel bound to its own
  :class:`~ditfleet.attention.sparge.SpargeParams` (``None``: that layer runs dense), which predicts
  its own mask from q and k, so the mask returned is ``None``. Unbound, it is an error.

A policy holds no per-forward state (the step comes with each call), so one object could serve two
DiTs of the same shape; the engine builds one per DiT anyway (Wan2.2 A14B's two experts each get
their own: their Sparge thresholds differ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from ..attention.radial import radial_mask_for

KINDS = ("dense", "radial", "sparge")
_RADIAL_FIELDS = ("decay_factor", "block_size", "dense_timesteps", "dense_layers")


def kind_of(kernel: AttentionBackend) -> str:
    """``"sparge"`` for a per-layer kernel, ``"radial"`` for one that takes block masks, else ``"dense"``."""
    if getattr(kernel, "per_layer", False):
        return "sparge"
    return "radial" if kernel.caps.block_mask else "dense"


@dataclass(frozen=True)
class LayerAttention:
    """What one self-attention layer runs at one step: ``kernel(q, k, v, block_mask=mask)``; ``mask`` ``None``: dense
    (or, for a Sparge kernel, the mask it predicts itself)."""

    kernel: AttentionBackend
    mask: BlockSparseMask | None


class SelfAttentionPolicy:
    """The self-attention choice of every (layer, step) of a DiT (see the module docstring).

    Args:
        kernel: the resolved self-attention kernel; it decides :attr:`kind`.
        radial: a :class:`~ditfleet.config.RadialAttnSetting` (or anything with ``decay_factor``,
            ``block_size``, ``dense_timesteps``, ``dense_layers``); used by a radial kernel only, so
            an engine may pass the config's whatever the kernel.
        dense_fallback: radial only: the kernel of the dense layers / steps; ``None``: the radial
            kernel without a mask.
        layers: sparge only: one kernel bound per layer (:func:`~ditfleet.attention.sparge.bind_layers`),
            or ``None`` (unbound).

    Raises:
        TypeError: ``radial`` lacks a field, or ``layers`` is given for a kernel that is not Sparge.
    """

    def __init__(self, kernel: AttentionBackend, *, radial: Any = None, dense_fallback: AttentionBackend | None = None,
                 layers: Sequence[AttentionBackend] | None = None):
        if radial is not None:
            for name in _RADIAL_FIELDS:
                if not hasattr(radial, name):
                    raise TypeError(f"radial setting has no {name!r} (pass a RadialAttnSetting)")
        self.kernel = kernel
        self.kind = kind_of(kernel)
        if layers is not None and self.kind != "sparge":
            raise TypeError(f"per-layer kernels given for {kernel.key}, which is not a Sparge kernel")
        self.radial = radial
        self.dense_fallback = dense_fallback if self.kind == "radial" else None
        self.layers: tuple[AttentionBackend, ...] | None = None if layers is None else tuple(layers)

    # ---- start-up -------------------------------------------------------------------------------
    def kernels(self) -> tuple[AttentionBackend, ...]:
        """Every kernel a forward may run (what a sequence-parallel layer checks and aligns its split to)."""
        main = self.layers if self.layers else (self.kernel,)
        return (*main, *((self.dense_fallback,) if self.dense_fallback is not None else ()))

    def check(self, *, num_layers: int, dtype: torch.dtype) -> None:
        """Before a forward: every kernel computes in ``dtype``; a Sparge policy is bound to ``num_layers`` layers.

        Raises:
            TypeError: a kernel built for another dtype.
            RuntimeError: a Sparge kernel not bound to its per-layer settings.
        """
        if self.kernel.dtype != dtype:
            raise TypeError(f"self-attention: kernel {self.kernel.key} was built for {self.kernel.dtype}, the model "
                            f"computes in {dtype}")
        fb = self.dense_fallback
        if fb is not None and fb.dtype != dtype:
            raise TypeError(f"dense_fallback: kernel {fb.key} was built for {fb.dtype}, the model computes in {dtype}")
        if self.kind == "sparge" and (self.layers is None or len(self.layers) != num_layers):
            raise RuntimeError(f"self-attention kernel {self.kernel.key} is bound per layer: build the policy with its "
                               "per-layer settings (build_policy(..., sparge_state=... or sparge_topk=...), or "
                               "engine.sparge_weights.bind_sparge) at start-up")

    # ---- per forward ----------------------------------------------------------------------------
    def choose(self, layer: int, step: int | None, grid: tuple[int, int, int]) -> LayerAttention:
        """The kernel and mask of layer ``layer`` (0-based) at denoising step ``step`` (0-based; ``None``: unknown)
        for a ``(frames, h, w)`` token grid.

        Raises:
            RuntimeError: a radial kernel without a setting; an unbound Sparge policy.
            ValueError: ``dense_timesteps > 0`` and no step index.
        """
        if self.kind == "dense":
            return LayerAttention(self.kernel, None)
        if self.kind == "sparge":
            if self.layers is None or not 0 <= layer < len(self.layers):
                raise RuntimeError(f"self-attention kernel {self.kernel.key} has no per-layer settings for layer {layer}: "
                                   "build the policy with them (build_policy(..., sparge_state=... or sparge_topk=...))")
            return LayerAttention(self.layers[layer], None)
        rs = self.radial
        if rs is None:
            raise RuntimeError(f"self-attention kernel {self.kernel.key} is radial but the policy has no radial setting: "
                               "build it with radial=cfg.radial_attn_setting at start-up")
        if step is None and int(rs.dense_timesteps) > 0:
            raise ValueError(f"radial_attn_setting.dense_timesteps={rs.dense_timesteps} needs the denoising step "
                             "index: call set_step(i) before each step's forward, or forward(..., step=i)")
        if (0 if step is None else step) < int(rs.dense_timesteps) or layer < int(rs.dense_layers):
            return LayerAttention(self.dense_fallback or self.kernel, None)
        f, h, w = grid
        return LayerAttention(self.kernel, radial_mask_for(f, h * w, rs))

    def plan(self, grid: tuple[int, int, int], step: int | None, num_layers: int) -> tuple[LayerAttention, ...]:
        """:meth:`choose` for layers ``0 .. num_layers - 1``."""
        return tuple(self.choose(i, step, grid) for i in range(num_layers))

    def describe(self) -> str:
        """One line for start-up logs."""
        if self.kind == "dense":
            return f"self-attention: dense ({self.kernel.key})"
        if self.kind == "radial":
            rs = self.radial
            if rs is None:
                return f"radial ({self.kernel.key}): no setting"
            fb = self.dense_fallback.key if self.dense_fallback is not None else f"{self.kernel.key} unmasked"
            return (f"radial ({self.kernel.key}): decay {rs.decay_factor}, block {rs.block_size}, dense for the first "
                    f"{rs.dense_timesteps} step(s) and {rs.dense_layers} layer(s) ({fb})")
        if not self.layers:
            return "sparge: not bound"
        dense = [i for i, b in enumerate(self.layers) if b.params is None]
        modes = {b.params.mode for b in self.layers if b.params is not None}
        return (f"sparge ({self.layers[0].key}): {len(self.layers) - len(dense)} of {len(self.layers)} "
                f"blocks sparse ({'/'.join(sorted(modes)) or '-'} mode)" + (f", dense blocks {dense}" if dense else ""))


def sparge_layer_params(*, num_layers: int, num_heads: int, state: Mapping[str, torch.Tensor] | None = None,
                        topk: float | None = None, source: str = "sparge_ckpt") -> list:
    """Each layer's :class:`~ditfleet.attention.sparge.SpargeParams` (``None``: dense): from a SpargeAttn-format
    ``state`` (validated against ``num_layers`` x ``num_heads``; layers absent from it run dense, one warning lists
    them; layer ``i`` gets exactly the keys ``blocks.{i}.…``), else top-k ``topk`` for every layer.

    Raises:
        SpargeCheckpointError: ``state`` does not fit (names ``source`` and the key).
    """
    from ..attention.sparge_ckpt import SpargeCheckpoint, layer_params

    ckpt = None
    if state is not None:
        ckpt = SpargeCheckpoint.from_state_dict(state, num_layers=num_layers, num_heads=num_heads, source=source)
    return layer_params(num_layers=num_layers, num_heads=num_heads, checkpoint=ckpt, topk=topk)


def build_policy(
    kernel: AttentionBackend,
    *,
    num_layers: int,
    num_heads: int,
    radial: Any = None,
    dense_fallback: AttentionBackend | None = None,
    sparge_layers: Sequence | None = None,
    sparge_state: Mapping[str, torch.Tensor] | None = None,
    sparge_topk: float | None = None,
    source: str = "sparge_ckpt",
) -> SelfAttentionPolicy:
    """The policy of a DiT of ``num_layers`` self-attention layers of ``num_heads`` heads (start-up).

    Args:
        kernel: the resolved self-attention kernel.
        radial, dense_fallback: see :class:`SelfAttentionPolicy` (ignored unless the kernel is radial).
        sparge_layers: a Sparge kernel's per-layer :class:`~ditfleet.attention.sparge.SpargeParams`
            (``None`` entries: dense layers); else ``sparge_state`` (a SpargeAttn state dict, named
            ``source`` in errors), else ``sparge_topk`` for every layer; none of them: unbound (an
            error at the first forward). Ignored unless the kernel is Sparge.

    Raises:
        ValueError: wrong number of layers or heads in ``sparge_layers``.
        SpargeCheckpointError: ``sparge_state`` does not fit the DiT.
    """
    layers = None
    if kind_of(kernel) == "sparge":
        from ..attention.sparge import bind_layers

        if sparge_layers is None and (sparge_state is not None or sparge_topk is not None):
            sparge_layers = sparge_layer_params(num_layers=num_layers, num_heads=num_heads, state=sparge_state,
                                                topk=sparge_topk, source=source)
        if sparge_layers is not None:
            params = list(sparge_layers)
            if len(params) != num_layers:
                raise ValueError(f"sparge: {len(params)} layer settings for a DiT of {num_layers} blocks")
            bad = [i for i, p in enumerate(params) if p is not None and p.num_heads != num_heads]
            if bad:
                raise ValueError(f"sparge: block {bad[0]} has settings for {params[bad[0]].num_heads} heads, "
                                 f"the DiT has {num_heads}")
            layers = bind_layers(kernel, params)
    return SelfAttentionPolicy(kernel, radial=radial, dense_fallback=dense_fallback, layers=layers)
