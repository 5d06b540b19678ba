"""The Wan2.1 diffusion transformer (``WanDiT``), matching the official ``WanModel`` math.

Parameter names are the official release's (``blocks.0.self_attn.q.weight`` ...), so an
official state dict loads as is; :mod:`.loader` maps Diffusers names onto them.

Precision follows the official model (fp32 weights under bf16 autocast): the residual stream,
the time embedding, the modulation and every norm are float32; the large matmuls (attention
projections, FFN, text / image embeddings, patch embedding) and attention run in the model dtype;
the head runs in float32 (it sits inside the official model's fp32 autocast region).
Parameters of the float32 parts stay float32 whatever the model dtype (:meth:`WanDiT.cast_`).

Attention runs through backends chosen once, at start-up, per site (``self_attn_1_type``,
``cross_attn_1_type``, ``cross_attn_2_type``); self-attention goes through the model's
:class:`~ditfleet.models.sp.SeqParallel`, which is the plain kernel unless a mesh with an SP
degree > 1 was set (:meth:`WanDiT.set_parallel`).

Self-attention asks the DiT's :class:`~ditfleet.models.attention_policy.SelfAttentionPolicy`
(:meth:`WanDiT.set_policy`, built once at start-up by the engine from the run's kernel, radial setting
and Sparge per-layer settings) which kernel and which block mask each block runs at the forward's
denoising step (``forward(..., step=i)`` or :meth:`WanDiT.set_step`) on its ``(F', H', W')`` token grid;
:meth:`WanDiT.set_attention` starts from the kernel's default policy (dense; radial without a setting
and Sparge unbound both refuse to run). Under sequence parallelism the same global mask goes to
:func:`~ditfleet.parallel.sequence_parallel_attention`; a Sparge block's kernel predicts its own mask
(the parallel layer narrows it to a rank's heads under Ulysses or builds the global mask from gathered
statistics under ring / USP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention.base import AttentionBackend
from ...attention.blockmask import BlockSparseMask
from ...errors import ConfigError
from ..attention_policy import SelfAttentionPolicy
from ..sp import SeqParallel, SeqParallelPlan
from . import ops
from .config import WanDiTConfig
from .rope import rope_table, sinusoidal_embedding
from .sites import IMAGE_SITE, SELF_SITE, TEXT_SITE
IMAGE_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by the official img_emb (MLPProj)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` with ``x`` cast to the layer's dtype first."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a block linear computes in: its weight's, or a quantised linear's output dtype (``out_dtype``)."""
    out = getattr(layer, "out_dtype", None)
    return out if out is not None else layer.weight.dtype


def _input_dtype(dtype: torch.dtype, *layers: nn.Module) -> torch.dtype:
    """What the norm before ``layers`` emits: ``ops.FP8`` (quantised per token in the norm's pass) when every one
    of them takes quantised rows (``takes_fp8``: :class:`~ditfleet.models.quant.Fp8Linear`), else ``dtype``."""
    return ops.FP8 if all(getattr(m, "takes_fp8", False) for m in layers) else dtype


@dataclass(frozen=True)
class _Attend:
    """What one forward's blocks attend with: the self-attention callable and the cross kernels."""

    self_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    text: AttentionBackend
    image: AttentionBackend | None


@dataclass(frozen=True)
class TokenRows:
    """Per-token float32 rows stored once per distinct value: token ``(b, s)``'s row is ``values[index[b, s]]``.

    Per-token timesteps take few values (TI2V image-to-video: 0 on the first frame, ``t`` elsewhere), so the time
    embeddings ``e`` / ``e0`` are kept this way, and each block gathers its six ``[B, S, C]`` modulation rows one
    at a time where they are used -- instead of a ``[B, S, 6, C]`` table, its sum with the block's modulation and
    six copies (about 6 GB at TI2V-5B 720p x 121, 27,280 tokens of 3,072; this way about 1 GB).

    Attributes:
        values: float32 ``[U, *row]`` (``[U, C]`` for ``e``, ``[U, 6, C]`` for ``e0``).
        index: int64 ``[B, S]`` into ``values``.
    """

    values: torch.Tensor
    index: torch.Tensor

    def take(self) -> torch.Tensor:
        """The rows of every token: float32 ``[B, S, *row]``."""
        return self.values[self.index]


class WanSelfAttention(nn.Module):
    """q, k, v, o projections; RMSNorm over the full dim on q and k; 3D RoPE; attention by the site's kernel."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, dim // num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else None

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: Callable) -> torch.Tensor:
        """``h`` ``[B, S, C]`` model dtype (or ``ops.Fp8Rows`` for quantised projections); ``rope`` float32 cos / sin
        ``[S, D/2]``; returns ``[B, S, C]`` model dtype."""
        b, s, c = h.shape
        cos, sin = rope
        wq = None if self.norm_q is None else self.norm_q.weight
        wk = None if self.norm_k is None else self.norm_k.weight
        q, k = self.q(h), self.k(h)
        q = ops.norm_rope(q, wq, self.eps, cos, sin, self.num_heads, q.dtype)
        k = ops.norm_rope(k, wk, self.eps, cos, sin, self.num_heads, k.dtype)
        v = self.v(h).view(b, s, self.num_heads, self.head_dim)
        return self.o(attend(q, k, v).reshape(b, s, c))


class WanCrossAttention(nn.Module):
    """Video queries against the text context (and, for I2V, the CLIP image tokens), no position encoding.

    Like the official model, the text keys include the zero-padded positions (no mask), and the
    image branch is a separate softmax whose output is added before ``o``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, dim // num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else None
        self.image = image
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps) if qk_norm else None

    def _kv(self, ctx: torch.Tensor, k: nn.Linear, v: nn.Linear, norm: nn.RMSNorm | None):
        b, n, _ = ctx.shape
        key = ops.rms_norm(k(ctx), None if norm is None else norm.weight, self.eps, ctx.dtype)
        return key.view(b, n, self.num_heads, self.head_dim), v(ctx).view(b, n, self.num_heads, self.head_dim)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor, ctx_img: torch.Tensor | None, attend: _Attend) -> torch.Tensor:
        """``h`` ``[B, S, C]`` (or ``ops.Fp8Rows`` for a quantised ``q``), ``ctx`` ``[B, L, C]``, ``ctx_img``
        ``[B, 257, C]`` or None; all model dtype."""
        b, s, c = h.shape
        q = self.q(h)
        q = ops.rms_norm(q, None if self.norm_q is None else self.norm_q.weight, self.eps, q.dtype)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k, v = self._kv(ctx, self.k, self.v, self.norm_k)
        out = attend.text(q, k, v)[0]
        if self.image:
            k_img, v_img = self._kv(ctx_img, self.k_img, self.v_img, self.norm_k_img)
            out = out + attend.image(q, k_img, v_img)[0]
        return self.o(out.reshape(b, s, c))


class WanBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention after ``norm3``, modulated FFN."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.eps = eps
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.qk_norm, eps, image=cfg.has_image_branch)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        carry: tuple[torch.Tensor, torch.Tensor] | None,
        e0: torch.Tensor,
        ctx: torch.Tensor,
        ctx_img: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: _Attend,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One block, with the FFN residual deferred to whoever reads the stream next.

        The official block ends with ``x + ffn(...) * gate``; here that update is returned as
        ``carry = (ffn_out, gate)`` and applied by the next block's (or the head's) first norm in
        the same pass, so the float32 stream is read and written once less per block. The math
        is unchanged: ``x_next = x + ffn_out * gate``.

        Args:
            x: float32 ``[B, S, C]`` residual stream (not modified).
            carry: the previous block's deferred ``(ffn_out [B, S, C], gate [B, 1, C] or [B, S, C])``, or ``None``.
            e0: float32 ``[B, 6, C]`` projected time embedding, or per token (per-token timesteps, TI2V
                image-to-video) :class:`TokenRows` of ``[U, 6, C]`` rows.
            ctx: ``[B, L, C]`` embedded text, model dtype.
            ctx_img: ``[B, 257, C]`` embedded CLIP tokens (I2V) or ``None``.
            rope: float32 cos / sin ``[S, D/2]`` of the tokens of ``x``.
            attend: the attention callables of this forward.

        Returns:
            ``(x, carry)``: float32 ``[B, S, C]`` stream before this block's FFN residual, and that residual.
        """
        dtype = _compute_dtype(self.ffn[0])
        sa, ca = self.self_attn, self.cross_attn  # quantised linears: the norm before them quantises in its pass
        self_in, cross_in = _input_dtype(dtype, sa.q, sa.k, sa.v), _input_dtype(dtype, ca.q)
        ffn_in = _input_dtype(dtype, self.ffn[0])
        if isinstance(e0, TokenRows):  # per token: [U, 6, C] rows, each [B, S, C] gathered where it is used
            table = self.modulation.float()[0] + e0.values

            def mod(i: int) -> torch.Tensor:
                return table[:, i][e0.index]
        else:  # one timestep per sample: [1, 6, C] + [B, 6, C] -> six [B, 1, C]
            six = [m.contiguous() for m in (self.modulation.float() + e0).unsqueeze(2).unbind(1)]

            def mod(i: int) -> torch.Tensor:
                return six[i]
        # order of mod(i): shift1, scale1, gate1, shift2, scale2, gate2
        if carry is None:
            h = ops.modulated_norm(x, mod(0), mod(1), self.eps, self_in)
        else:
            x, h = ops.residual_modulated_norm(x, carry[0], carry[1], mod(0), mod(1), self.eps, self_in)
        y = self.self_attn(h, rope, attend.self_attention)
        n3 = self.norm3
        x, h = ops.gated_residual_norm(
            x, y, mod(2), None if n3 is None else n3.weight, None if n3 is None else n3.bias, self.eps, cross_in
        )
        y = self.cross_attn(h, ctx, ctx_img, attend)
        x, h = ops.residual_modulated_norm(x, y, None, mod(3), mod(4), self.eps, ffn_in)
        return x, (self.ffn(h), mod(5))


class WanHead(nn.Module):
    """Output head: parameter-free LayerNorm modulated by the time embedding ``e``, then a linear layer."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Output projection.

        Args:
            x: float32 ``[B, S, C]``.
            e: float32 ``[B, C]`` time embedding (not the projected ``e0``), or per token :class:`TokenRows` of
                ``[U, C]`` rows.
            carry: the last block's deferred FFN residual ``(ffn_out, gate)``, or ``None``.

        Returns:
            ``[B, S, prod(patch) * out_dim]`` in the head's dtype (float32).
        """
        if isinstance(e, TokenRows):  # per token: [2, C] + [U, 1, C] -> rows [U, 2, C] -> shift, scale [B, S, C]
            table = self.modulation.float()[0] + e.values.unsqueeze(1)
            shift, scale = table[:, 0][e.index], table[:, 1][e.index]
        else:  # [1, 2, C] + [B, 1, C] -> shift, scale [B, 1, C]
            mod = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)
            shift, scale = (m.contiguous() for m in mod)
        if carry is None:
            h = ops.modulated_norm(x, shift, scale, self.eps, self.head.weight.dtype)
        else:
            _, h = ops.residual_modulated_norm(x, carry[0], carry[1], shift, scale, self.eps, self.head.weight.dtype)
        return self.head(h)


class WanImageEmbedding(nn.Module):
    """CLIP tokens -> model dim: LayerNorm, Linear, GELU, Linear, LayerNorm (official ``MLPProj``)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d_in = cfg.image_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(d_in), nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * 257, d_in))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``clip_fea`` ``[B, 257, image_dim]`` (flf2v: ``[B, 514, ...]`` or ``[2B, 257, ...]``) -> ``[B, N, C]`` in ``dtype``."""
        ln0, fc1, _, fc2, ln4 = self.proj
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x.reshape(-1, self.emb_pos.shape[1], x.shape[-1]) + self.emb_pos.float()
        x = F.layer_norm(x, ln0.normalized_shape, ln0.weight.float(), ln0.bias.float(), IMAGE_LN_EPS)
        x = F.gelu(_linear(x, fc1))
        x = _linear(x, fc2).float()
        x = F.layer_norm(x, ln4.normalized_shape, ln4.weight.float(), ln4.bias.float(), IMAGE_LN_EPS)
        return x.to(dtype)


class WanDiT(nn.Module):
    """Wan2.1 DiT (T2V 1.3B / 14B, I2V 14B, FLF2V 14B) with per-site attention kernels.

    Build it with :func:`build_dit` (random weights) or :func:`ditfleet.models.wan.load_dit`
    (checkpoint); both give a model whose attention sites are set. ``forward`` is inference code:
    call it under ``torch.inference_mode()`` (or ``no_grad``).
    """

    #: Sequence parallelism: tokens are split right after the patch embedding (together with their
    #: RoPE rows: each rank rotates by its tokens' global positions) and gathered after the head,
    #: before unpatchify. Text and image contexts are never split. Per-token timesteps ``[B, S]``
    #: (TI2V image-to-video) are split with the tokens before the time embedding, so each rank
    #: embeds and modulates by its own tokens' timesteps.
    sp_plan = SeqParallelPlan(
        split={"tokens": 1, "rope_cos": 0, "rope_sin": 0},
        gather={"out": 1},
        doc="split video tokens (dim 1) after patch embedding, with per-token timesteps when given; "
            "gather head output (dim 1) before unpatchify",
        optional={"timesteps": 1},
    )
    #: The linears ``dit_quantized`` runs in FP8 (:mod:`ditfleet.models.quant`): every block's attention
    #: projections, cross-attention (text and image) and FFN; the patch / text / time / image embeddings, the
    #: modulation, the norms and the head stay in the compute dtype.
    quant_linears = (
        "blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
        "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
        "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img", "blocks.*.ffn.0", "blocks.*.ffn.2",
    )

    def __init__(self, config: WanDiTConfig, attention: Mapping[str, object] | None = None):
        super().__init__()
        cfg = self.config = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        if cfg.has_image_branch:
            self.img_emb = WanImageEmbedding(cfg)
        self.sp = SeqParallel(self.sp_plan)
        self.backends: dict[str, AttentionBackend] = {}
        self.policy: SelfAttentionPolicy | None = None  # set_attention's default, or set_policy's
        self._step: int | None = None
        self._rope_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        if attention is not None:
            self.set_attention(attention)

    # ---- set-up (start-up time, never per forward) ----------------------------------------------
    def required_sites(self) -> tuple[str, ...]:
        return (SELF_SITE, TEXT_SITE, IMAGE_SITE) if self.config.has_image_branch else (SELF_SITE, TEXT_SITE)

    def set_attention(self, attention: Mapping[str, object]) -> WanDiT:
        """Set each site's kernel: ``site -> AttentionBackend`` (or a registry ``Resolution``; ``None`` entries are skipped).

        Raises:
            ValueError: a site this model uses has no kernel.
        """
        backends = {}
        for site, value in attention.items():
            backend = getattr(value, "backend", value)
            if backend is not None:
                backends[site] = backend
        missing = [s for s in self.required_sites() if s not in backends]
        if missing:
            raise ValueError(f"no attention kernel for site(s) {', '.join(missing)} of this {self.config.model_type} model")
        per_layer = [s for s, b in backends.items() if getattr(b, "per_layer", False) and s != SELF_SITE]
        if per_layer:  # thresholds are tuned per self-attention layer; a cross site has nothing to bind
            raise ConfigError(per_layer[0], "sparge runs on self-attention only (self_attn_1_type); valid here: "
                              "torch_sdpa, flash_attn2, flash_attn3, flash_attn4, sage_attn2")
        self.backends = backends
        self.policy = SelfAttentionPolicy(backends[SELF_SITE])  # dense, or radial / Sparge waiting for set_policy
        self.sp.use_kernels(*self.policy.kernels())
        return self

    def set_policy(self, policy: SelfAttentionPolicy) -> WanDiT:
        """Self-attention's policy (start-up; :func:`~ditfleet.models.attention_policy.build_policy`): its kernel
        becomes the ``self_attn_1_type`` site's.

        Raises:
            ConfigError: under a ring mesh, one of its kernels returns no LSE (nothing is changed then).
        """
        self.sp.use_kernels(*policy.kernels())
        self.policy = policy
        self.backends[SELF_SITE] = policy.kernel
        return self

    def set_parallel(self, mesh) -> WanDiT:
        """Run self-attention sequence-parallel over ``mesh`` (a ``ParallelMesh``; ``None``: single process)."""
        self.sp = SeqParallel(self.sp_plan, mesh)
        if self.policy is not None:
            self.sp.use_kernels(*self.policy.kernels())
        return self

    def staged_forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """This forward split into prepare / blocks / finish for a step cache (:mod:`ditfleet.models.step_cache`);
        arguments as :meth:`forward` (``t`` ``[B]``, or ``[B, S]`` per token)."""
        from .cache_hooks import WanStagedForward

        return WanStagedForward(self, x, t, context, clip_fea, y)

    def published_cache_constants(self, family: str | None, latent_hw: tuple[int, int], use_ret_steps: bool):
        """:meth:`WanDiTConfig.published_cache_constants` at latents of ``latent_hw = (h, w)`` (Wan2.1's VAE: 8x)."""
        from .sites import VAE_STRIDE

        return self.config.published_cache_constants(family, latent_hw[0] * VAE_STRIDE[1], latent_hw[1] * VAE_STRIDE[2],
                                                     use_ret_steps)

    def set_step(self, step: int | None) -> WanDiT:
        """The denoising step index (0-based) of the following forwards (the policy's radial ``dense_timesteps``);
        ``forward(..., step=i)`` overrides it for one call. ``None``: unknown."""
        self._step = None if step is None else int(step)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the matmuls and attention."""
        return _compute_dtype(self.blocks[0].ffn[0]) if len(self.blocks) else self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def fp32_param_names(self) -> set[str]:
        """Parameters that stay float32 whatever the model dtype (time path, modulation, norms, head)."""
        names = set()
        for mname, module in self.named_modules():
            keep = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or mname in ("time_embedding", "time_projection", "head")
            if keep:
                names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters())
        names.update(n for n, _ in self.named_parameters() if n.endswith("modulation") or n.endswith("emb_pos"))
        return names

    def param_dtype(self, name: str, dtype: torch.dtype, fp32_names: set[str] | None = None) -> torch.dtype:
        """The dtype parameter ``name`` has in a model of compute dtype ``dtype``."""
        return torch.float32 if name in (fp32_names if fp32_names is not None else self.fp32_param_names()) else dtype

    def cast_(self, dtype: torch.dtype) -> WanDiT:
        """Cast in place to compute dtype ``dtype``, keeping the float32 parts float32 (works on ``meta``)."""
        keep = self.fp32_param_names()
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if name in keep else dtype)
        return self

    @torch.no_grad()
    def init_random_(self, seed: int = 0, std: float = 0.02) -> WanDiT:
        """Fill every parameter in place with cheap random values on its own device (benchmarks, tests).

        Weights ``N(0, std)``, biases ``N(0, std)``, norm weights ``1 + N(0, std)``, modulation
        ``N(0, 1) / sqrt(dim)`` (as the official init).
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0.0, self.config.dim**-0.5, generator=gen)
            elif p.dim() == 1 and ("norm" in name or name.startswith("img_emb.proj.0") or name.startswith("img_emb.proj.4")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        return self

    # ---- pieces of the forward ------------------------------------------------------------------
    def embed_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch embedding as one matmul over non-overlapping patches (same math as the Conv3d).

        Args:
            x: ``[B, in_dim, F, H, W]`` with ``F, H, W`` multiples of the patch size.

        Returns:
            ``(tokens, grid)``: float32 ``[B, f*h*w, dim]`` in ``(f, h, w)`` raster order, and ``(f, h, w)``.
        """
        b, c, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent [F, H, W] = {[f, h, w]} is not a multiple of the patch size {[pt, ph, pw]}")
        grid = (f // pt, h // ph, w // pw)
        weight = self.patch_embedding.weight
        patches = x.to(weight.dtype).reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), c * pt * ph * pw)
        tokens = F.linear(patches, weight.reshape(weight.shape[0], -1), self.patch_embedding.bias)
        return tokens.float(), grid

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos / sin ``[f*h*w, head_dim/2]`` for ``grid`` (cached for the last grid)."""
        key = (tuple(grid), str(device))
        if self._rope_cache is None or self._rope_cache[0] != key:
            table = rope_table(grid, self.config.head_dim, device=device, max_seq_len=self.config.rope_max_seq_len)
            self._rope_cache = (key, table)
        return self._rope_cache[1]

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, L <= text_len, text_dim]`` -> ``[B, text_len, dim]`` model dtype (zero-padded to ``text_len`` first)."""
        b, n, d = context.shape
        cfg = self.config
        if d != cfg.text_dim:
            raise ValueError(f"context has {d} features, the model's text_dim is {cfg.text_dim}")
        if n > cfg.text_len:
            raise ValueError(f"context has {n} tokens, more than the model's text_len {cfg.text_len}")
        if n < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - n))
        fc1, _, fc2 = self.text_embedding
        return _linear(F.gelu(_linear(context, fc1), approximate="tanh"), fc2)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor | TokenRows, torch.Tensor | TokenRows]:
        """``t`` ``[B]`` -> ``(e [B, dim], e0 [B, 6, dim])``, float32; per token, ``t`` ``[B, S]`` -> the same as
        :class:`TokenRows` (``[U, dim]`` and ``[U, 6, dim]`` rows, ``index`` ``[B, S]``).

        Per-token timesteps take few distinct values (TI2V image-to-video: 0 on the first frame, ``t``
        elsewhere), so the embedding runs once per distinct value and the tokens index it.
        """
        if t.dim() == 2:
            values, index = torch.unique(t, return_inverse=True)
            e, e0 = self.embed_time(values)
            return TokenRows(e, index), TokenRows(e0, index)
        fc1, _, fc2 = self.time_embedding
        e = _linear(F.silu(_linear(sinusoidal_embedding(t, self.config.freq_dim), fc1)), fc2).float()
        e0 = _linear(F.silu(e), self.time_projection[1]).float()
        return e, e0.unflatten(1, (6, self.config.dim))

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, prod(patch) * out_dim]`` -> ``[B, out_dim, f*pt, h*ph, w*pw]``."""
        b = out.shape[0]
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        out = out.reshape(b, f, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * pt, h * ph, w * pw)

    def _check_backends(self) -> None:
        if not self.backends:
            raise RuntimeError("WanDiT has no attention kernels: call set_attention(...) at start-up "
                               "(e.g. with RunConfig.resolve_attention() or default_attention())")
        for site in self.required_sites():
            b = self.backends[site]
            if b.dtype != self.dtype:
                raise TypeError(f"{site}: kernel {b.key} was built for {b.dtype}, the model computes in {self.dtype}")
        self.policy.check(num_layers=self.config.num_layers, dtype=self.dtype)

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> torch.Tensor:
        """Predict the flow (velocity) of the noisy latent ``x`` at time ``t``.

        Args:
            x: ``[B, 16, F, H, W]`` noisy latent (any float dtype).
            t: ``[B]`` timesteps (0..1000); a single value is used for the whole batch; or ``[B, S]`` (``[1, S]``:
                for the whole batch) one per token (``S = F*H*W / prod(patch)``, the patch grid in raster order;
                TI2V image-to-video).
            context: ``[B, L, text_dim]`` UMT5 features, ``L <= text_len`` (zero-padded to ``text_len``
                inside, as the official model; padded positions are attended to, unmasked).
            clip_fea: I2V: ``[B, 257, 1280]`` CLIP image features; ``None`` for T2V.
            y: I2V: ``[B, 20, F, H, W]`` conditioning (mask + encoded image), concatenated to ``x``
                along channels inside the model (``in_dim`` 36); ``None`` for T2V.
            step: denoising step index (0-based) for the policy (radial ``dense_timesteps``); ``None``: the one
                :meth:`set_step` set (if any).

        Returns:
            float32 ``[B, out_dim, F, H, W]``; identical on every rank under sequence parallelism.
        """
        state = self.prepare(x, t, context, clip_fea, y, step=step)
        h, carry = state.tokens, None
        for i, block in enumerate(self.blocks):
            h, carry = block(h, carry, *state.args_for(i))
        return self.finish(h, state, carry)

    def prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> DiTStep:
        """Everything before the blocks: embeddings, RoPE, the sequence split, each block's self-attention
        (the policy's kernel and mask) (arguments as :meth:`forward`)."""
        cfg = self.config
        self._check_backends()
        if cfg.has_image_branch and (clip_fea is None or y is None):
            raise ValueError(f"a {cfg.model_type} model needs clip_fea and y")
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"input has {x.shape[1]} channels (x plus y), the model's in_dim is {cfg.in_dim}")
        b = x.shape[0]
        if t.numel() == 1:
            t = t.reshape(1).expand(b)
        elif t.dim() == 2 and t.shape[0] == 1:  # one per-token row for the whole batch
            t = t.expand(b, -1)
        if t.shape[:1] != (b,) or t.dim() > 2 or context.shape[0] != b or (
                clip_fea is not None and clip_fea.shape[0] not in (b, 2 * b)):
            raise ValueError(f"batch sizes disagree: x {b}, t {tuple(t.shape)}, context {context.shape[0]}"
                             + ("" if clip_fea is None else f", clip_fea {clip_fea.shape[0]}"))
        dtype, device = self.dtype, self.device
        tokens, grid = self.embed_video(x.to(device))
        if t.dim() == 2 and t.shape[1] != tokens.shape[1]:
            raise ValueError(f"per-token timesteps: t has {t.shape[1]} per sample, the latent has {tokens.shape[1]} "
                             f"tokens (grid {list(grid)})")
        cos, sin = self.rope(grid, device)
        ctx = self.embed_text(context.to(device))
        ctx_img = self.img_emb(clip_fea.to(device), dtype) if cfg.has_image_branch else None

        plan = self.policy.plan(grid, self._step if step is None else step, len(self.blocks))
        per_token = {"timesteps": t.to(device)} if t.dim() == 2 else {}
        local, shard = self.sp.split(tokens=tokens, rope_cos=cos, rope_sin=sin, **per_token)
        e, e0 = self.embed_time(local["timesteps"] if per_token else t.to(device))
        sp, text, image = self.sp, self.backends[TEXT_SITE], self.backends.get(IMAGE_SITE)

        def attend_with(kernel: AttentionBackend, mask: BlockSparseMask | None) -> _Attend:
            return _Attend(lambda q, k, v: sp.attention(q, k, v, backend=kernel, shard=shard, block_mask=mask), text, image)

        by_choice: dict[tuple[int, int], _Attend] = {}  # one per distinct (kernel, mask): two at most unless Sparge
        for c in plan:
            by_choice.setdefault((id(c.kernel), id(c.mask)), attend_with(c.kernel, c.mask))
        layers = tuple(by_choice[id(c.kernel), id(c.mask)] for c in plan)
        return DiTStep(local["tokens"], e, e0, ctx, ctx_img, (local["rope_cos"], local["rope_sin"]),
                       layers[0] if layers else attend_with(self.policy.kernel, None), grid, shard, layers,
                       tuple(c.mask for c in plan))

    def finish(self, h: torch.Tensor, step: DiTStep, carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Head, gather, unpatchify: ``h`` float32 ``[B, S_local, C]`` (+ the last block's ``carry``) -> float32 ``[B, out_dim, F, H, W]``."""
        out = self.head(h, step.e, carry)
        out = self.sp.gather(step.shard, out=out)["out"]
        return self.unpatchify(out, step.grid).float()


@dataclass
class DiTStep:
    """The per-forward state the blocks share (built by :meth:`WanDiT.prepare`).

    Attributes:
        tokens: float32 ``[B, S_local, C]`` this rank's video tokens (all of them without SP).
        e: float32 ``[B, C]`` time embedding (head modulation); for per-token timesteps :class:`TokenRows`
            (``[U, C]`` rows, ``index`` ``[B, S_local]``).
        e0: float32 ``[B, 6, C]`` projected time embedding (block modulation); per token :class:`TokenRows`
            (``[U, 6, C]`` rows).
        ctx: ``[B, text_len, C]`` embedded text, model dtype.
        ctx_img: ``[B, 257, C]`` embedded CLIP tokens or ``None``.
        rope: float32 cos / sin ``[S_local, D/2]`` at the tokens' global positions.
        attend: the attention callables of block 0.
        grid: ``(f, h, w)`` token grid of the whole video.
        shard: the ``SeqShard`` under sequence parallelism, else ``None``.
        layer_attend: the attention callables of each block.
        self_masks: each block's self-attention mask (global), ``None`` where it runs dense.
    """

    tokens: torch.Tensor
    e: torch.Tensor | TokenRows
    e0: torch.Tensor | TokenRows
    ctx: torch.Tensor
    ctx_img: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor]
    attend: _Attend
    grid: tuple[int, int, int]
    shard: object | None
    layer_attend: tuple[_Attend, ...] = ()
    self_masks: tuple[BlockSparseMask | None, ...] = ()

    @property
    def block_args(self) -> tuple:
        """Arguments after ``x, carry`` of block 0's ``WanBlock.forward`` (see :meth:`args_for`)."""
        return (self.e0, self.ctx, self.ctx_img, self.rope, self.attend)

    def args_for(self, layer: int) -> tuple:
        """Arguments after ``x, carry`` of block ``layer``'s ``WanBlock.forward`` (its self-attention mask)."""
        attend = self.layer_attend[layer] if self.layer_attend else self.attend
        return (self.e0, self.ctx, self.ctx_img, self.rope, attend)


def default_attention(config: WanDiTConfig, device: torch.device | str, dtype: torch.dtype, attn_type: str = "torch_sdpa"):
    """Resolve ``attn_type`` for every site ``config`` uses (start-up helper; engines pass their own).

    Returns:
        ``{site: AttentionBackend}``.
    """
    from ...attention.registry import resolve

    sites = (SELF_SITE, TEXT_SITE, IMAGE_SITE) if config.has_image_branch else (SELF_SITE, TEXT_SITE)
    return {s: resolve(attn_type, site=s, device=device, dtype=dtype).backend for s in sites}


def build_dit(
    config: WanDiTConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: Mapping[str, object] | None = None,
    seed: int | None = 0,
    std: float = 0.02,
) -> WanDiT:
    """A randomly initialised ``WanDiT`` built directly on ``device`` (no CPU copy, no slow init).

    The modules are created on ``meta``, cast (float32 parts kept), materialised on ``device`` and
    filled by :meth:`WanDiT.init_random_` there. ``seed=None`` leaves the memory uninitialised.

    Args:
        config: hyperparameters.
        device: target device.
        dtype: compute dtype.
        attention: ``site -> backend``; ``None`` resolves ``torch_sdpa`` for every site.
        seed, std: random init (see :meth:`WanDiT.init_random_`).
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = WanDiT(config)
    model.cast_(dtype).to_empty(device=device)
    if seed is not None:
        model.init_random_(seed=seed, std=std)
    model.requires_grad_(False).eval()
    model.set_attention(attention if attention is not None else default_attention(config, device, dtype))
    return model
