"""The one attention-backend contract every kernel family implements.

Tensors at the boundary are ``[B, S, H, D]`` (batch, sequence, heads, head dim); the
log-sum-exp (LSE) is float32 ``[B, H, S_q]`` in natural-log units, i.e.
``lse[b, h, i] = log(sum_j exp(scale * q_i . k_j))`` over the valid keys ``j``.

This package knows nothing of processes, meshes or models: the parallel wrappers in
``ditfleet.parallel`` call backends through this interface only.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .blockmask import BlockSparseMask

LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})
ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Capabilities:
    """What a kernel supports. The registry and the parallel wrappers rely on these declarations.

    Attributes:
        lse: returns the float32 LSE ``[B, H, S_q]`` when asked (required by ring attention).
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: q/k/v dtypes it accepts.
        max_head_dim: largest head dim it accepts.
        min_compute_capability: lowest CUDA ``(major, minor)``; ``None`` for no requirement.
        block_mask: accepts a block-sparse mask (radial / sparge kernels).
    """

    lse: bool
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int = 256
    min_compute_capability: tuple[int, int] | None = None
    block_mask: bool = False


def module_available(name: str) -> bool:
    """True when ``import name`` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        return False


def cuda_capability_reasons(device: torch.device, minimum: tuple[int, int] | None) -> list[str]:
    """Reasons a CUDA device cannot run a kernel needing compute capability ``minimum``."""
    if device.type != "cuda":
        return [f"needs a CUDA GPU (device is {device.type})"]
    if not torch.cuda.is_available():
        return ["needs a CUDA GPU (torch.cuda.is_available() is False)"]
    if minimum is not None:
        cc = torch.cuda.get_device_capability(device)
        if cc < minimum:
            return [f"needs compute capability >= {minimum[0]}.{minimum[1]} (GPU has {cc[0]}.{cc[1]})"]
    return []


@dataclass
class AttentionBackend(ABC):
    """A kernel behind the contract ``forward(q, k, v, *, scale, kv_lens, return_lse, block_mask) -> (out, lse)``.

    Subclasses set ``key`` (short id used in logs and reports), ``description`` (what runs),
    ``caps`` and ``install_hint``; they implement ``_forward`` for dense, unpadded inputs and,
    where needed, extend ``unavailable_reasons``. Instances are built once, at start-up, for one
    device and dtype. A kernel with ``caps.block_mask`` also accepts ``block_mask=`` in
    ``_forward`` (it is passed only when not ``None``, so other kernels need no such parameter).
    """

    device: torch.device
    dtype: torch.dtype

    key: ClassVar[str]
    description: ClassVar[str]
    caps: ClassVar[Capabilities]
    install_hint: ClassVar[str] = ""
    requires_modules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def unavailable_reasons(cls, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this kernel cannot run on ``device`` with ``dtype``; empty when it can."""
        reasons: list[str] = []
        for mod in cls.requires_modules:
            if not module_available(mod):
                reasons.append(f"package `{mod}` is not installed" + (f" ({cls.install_hint})" if cls.install_hint else ""))
        if device.type not in cls.caps.devices:
            if cls.caps.devices == frozenset({"cuda"}):
                reasons.extend(cuda_capability_reasons(device, None))
            else:
                reasons.append(f"runs on {sorted(cls.caps.devices)}, not {device.type}")
        elif device.type == "cuda":
            reasons.extend(cuda_capability_reasons(device, cls.caps.min_compute_capability))
        if dtype not in cls.caps.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in cls.caps.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {', '.join(names)})")
        return reasons

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        kv_lens: Sequence[int] | None = None,
        return_lse: bool = False,
        block_mask: BlockSparseMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of every query over the (valid) keys, no causal mask, no dropout.

        Args:
            q: ``[B, S_q, H, D]``, dtype and device the backend was built for.
            k: ``[B, S_k, H, D]``, same dtype/device; ``S_k`` may differ from ``S_q``.
            v: ``[B, S_k, H, D]``.
            scale: softmax scale; ``None`` means ``D ** -0.5``.
            kv_lens: per batch element, how many leading keys are valid (``1 <= kv_lens[b] <= S_k``);
                the rest are padding and take no part. ``None``: all keys are valid.
            return_lse: also return the float32 LSE ``[B, H, S_q]`` (natural log). Raises
                ``NotImplementedError`` if the kernel does not produce it.
            block_mask: a :class:`~ditfleet.attention.blockmask.BlockSparseMask` of shape
                ``(S_q, S_k)`` (the same for every batch element and head): query ``i`` attends key
                ``j`` only where it allows. Rows it leaves without any key get ``out = 0`` and
                ``lse = -inf``. Combined with ``kv_lens``, the mask is restricted to the valid keys.
                Raises ``NotImplementedError`` if the kernel does not take block masks
                (``caps.block_mask`` False); ``None`` means dense.

        Returns:
            ``(out, lse)``: ``out`` is ``[B, S_q, H, D]`` in q's dtype; ``lse`` is float32
            ``[B, H, S_q]`` or ``None`` when ``return_lse`` is False.
        """
        self._check(q, k, v, kv_lens, return_lse)
        if block_mask is not None:
            if not self.caps.block_mask:
                raise NotImplementedError(f"{self.key} ({self.description}) does not take a block-sparse mask")
            if tuple(block_mask.shape) != (q.shape[1], k.shape[1]):
                raise ValueError(f"{self.key}: block_mask is {tuple(block_mask.shape)} for S_q x S_k = {q.shape[1]} x {k.shape[1]}")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        extra = {} if block_mask is None else {"block_mask": block_mask}
        lens = None if kv_lens is None else [int(n) for n in kv_lens]
        if lens is None or all(n == k.shape[1] for n in lens):
            return self._forward(q, k, v, scale=scale, return_lse=return_lse, **extra)
        # Padded keys are excluded by slicing them away: exact for every kernel, and one kernel
        # call per distinct length (in practice one: a sequence is padded at its end only).
        out = q.new_empty(q.shape)
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if return_lse else None
        for n in sorted(set(lens)):
            idx = [b for b, m in enumerate(lens) if m == n]
            sel = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
            if block_mask is not None:
                extra = {"block_mask": block_mask.sub(0, q.shape[1], 0, n)}
            o, l = self._forward(
                q[sel], k[sel, :n].contiguous(), v[sel, :n].contiguous(), scale=scale, return_lse=return_lse, **extra
            )
            out[sel] = o
            if lse is not None:
                lse[sel] = l
        return out, lse

    __call__ = forward

    @property
    def seq_tile(self) -> tuple[int, int] | None:
        """The ``(query, key)`` tile in tokens of this kernel's block-sparse path; ``None``: dense kernels.

        A mask window whose query / key offsets are multiples of it is cut into the tiles of the whole
        sequence (:meth:`~ditfleet.attention.blockmask.BlockSparseMask.on_tiles`), so full tiles stay full
        and no tile is split between two windows. The parallel layer aligns ring chunks to it
        (:func:`ditfleet.parallel.shard.tile_align`); a dense kernel needs no alignment (no extra padding).
        """
        return None

    # ---- hooks for kernels with per-head settings or their own masks (Sparge); others keep the defaults
    def for_heads(self, start: int, stop: int) -> AttentionBackend:
        """This kernel restricted to heads ``[start, stop)`` of the heads it was set up for.

        Ulysses calls it with the heads a rank (or a head group) holds after its all-to-all; a kernel
        whose settings differ per head (Sparge thresholds) returns one bound to those heads, heads at
        or past its head count being the zero padding Ulysses adds. Heads-agnostic kernels: ``self``.
        """
        return self

    @property
    def predicts_mask(self) -> bool:
        """True when the kernel computes its own block mask from the *whole* q and k sequences.

        Such a kernel cannot see the whole sequence under ring attention: the parallel layer then asks
        :meth:`predict_sharded_mask` for the global mask and runs ring steps with windows of it.
        """
        return False

    def predict_sharded_mask(self, q: torch.Tensor, k: torch.Tensor, *, q_offset: int, k_offset: int, q_length: int,
                             k_length: int, scale: float, all_reduce) -> BlockSparseMask:
        """The mask :attr:`predicts_mask` kernels would compute on the whole sequences, from a split one.

        Args:
            q, k: this process's chunks ``[B, S_local, H, D]`` at global offsets ``q_offset`` / ``k_offset``
                (rows at or past ``q_length`` / ``k_length`` are padding).
            scale: softmax scale.
            all_reduce: ``all_reduce(t)`` sums ``t`` in place over every process holding a chunk
                (the caller's collective: this package knows nothing of processes).

        Returns:
            The same root mask over the real ``q_length x k_length`` tokens on every process.
        """
        raise NotImplementedError(f"{self.key} does not predict a block mask")

    @abstractmethod
    def _forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, return_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention on validated inputs; same contract as ``forward`` without ``kv_lens``.

        Kernels with ``caps.block_mask`` take an extra keyword ``block_mask`` (never ``None`` when passed).
        """

    def _check(self, q, k, v, kv_lens, return_lse) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"{self.key}: q, k, v must be [B, S, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"{self.key}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        b, _, h, d = q.shape
        if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
            raise ValueError(f"{self.key}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
        if d > self.caps.max_head_dim:
            raise ValueError(f"{self.key}: head dim {d} > supported {self.caps.max_head_dim}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != self.dtype:
                raise TypeError(f"{self.key}: {name} is {t.dtype}, backend was built for {self.dtype}")
            if t.device.type != self.device.type:
                raise TypeError(f"{self.key}: {name} is on {t.device}, backend was built for {self.device}")
        if return_lse and not self.caps.lse:
            raise NotImplementedError(f"{self.key} ({self.description}) does not return the LSE")
        if kv_lens is not None:
            if len(kv_lens) != b:
                raise ValueError(f"{self.key}: kv_lens has {len(kv_lens)} entries for batch {b}")
            bad = [n for n in kv_lens if not 1 <= int(n) <= k.shape[1]]
            if bad:
                raise ValueError(f"{self.key}: kv_lens must lie in [1, {k.shape[1]}], got {bad}")


def attention_flops(b: int, s_q: int, s_k: int, h: int, d: int) -> float:
    """Matmul FLOPs of one attention forward (QK^T and PV): ``4 * B * H * S_q * S_k * D``."""
    return 4.0 * b * h * s_q * s_k * d
