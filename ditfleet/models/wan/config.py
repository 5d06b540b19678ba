"""Hyperparameters of a Wan2.1 DiT, and their two spellings: the official ``config.json`` and Diffusers'.

The official release writes only ``dim, eps, ffn_dim, freq_dim, in_dim, model_type, num_heads,
num_layers, out_dim, text_len`` (``WanModel`` ignores ``patch_size, cross_attn_norm, qk_norm,
text_dim, window_size`` when saving and uses its defaults). ditfleet reads those keys too when
present, and writes them only when they differ from the official defaults, so a converted real
checkpoint's config is identical to the official one while tiny test models stay expressible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("t2v", "i2v", "flf2v")
CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens of one reference image (flf2v: two images)
OFFICIAL_KEYS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len")
# Keys the official WanModel does not save; written only when not at these defaults.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "text_dim": 4096,
    "qk_norm": True,
    "cross_attn_norm": True,
    "window_size": (-1, -1),
    "image_dim": 1280,
    "rope_max_seq_len": 1024,
}


class WanConfigError(ValueError):
    """A config that does not describe a Wan2.1 DiT ditfleet can build (the message names the key)."""


@dataclass(frozen=True)
class WanDiTConfig:
    """Hyperparameters of a Wan2.1 DiT (official names).

    Attributes:
        model_type: ``"t2v"``, ``"i2v"`` (CLIP image branch, ``in_dim`` 36) or ``"flf2v"``. Image-conditioned DiTs
            without CLIP are ``"t2v"`` here, as Diffusers reads them: Wan2.2 A14B I2V (``in_dim`` 36 > ``out_dim``:
            the condition ``y`` enters as channels) and TI2V-5B (``in_dim == out_dim`` 48: its image replaces the
            first latent frame). The official config names them ``"i2v"`` / ``"ti2v"`` (:meth:`from_official`,
            :meth:`to_official`).
        patch_size: ``(t, h, w)`` patch of the Conv3d embedding.
        text_len: text tokens attended to (context is zero-padded to this length).
        in_dim: input channels of the patch embedding (16 latent + 20 conditioning for I2V).
        dim: hidden size.
        ffn_dim: FFN inner size.
        freq_dim: sinusoidal time-embedding size.
        text_dim: text-encoder (UMT5) feature size.
        out_dim: output latent channels.
        num_heads: attention heads (head dim ``dim // num_heads``).
        num_layers: transformer blocks.
        window_size: must be ``(-1, -1)`` (global attention; all released models).
        qk_norm: RMSNorm over the full ``dim`` on queries and keys.
        cross_attn_norm: affine LayerNorm (``norm3``) before cross-attention.
        eps: epsilon of every norm in the blocks and head.
        image_dim: CLIP feature size of the I2V image branch (1280 for every release).
        rope_max_seq_len: positions per RoPE axis (1024 in the official model).
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int = 1280
    rope_max_seq_len: int = field(default=1024)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "window_size", tuple(int(w) for w in self.window_size))
        if self.model_type not in MODEL_TYPES:
            raise WanConfigError(f"model_type: {self.model_type!r} is not valid; valid: {', '.join(MODEL_TYPES)}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise WanConfigError(f"patch_size: expected three positive integers, got {self.patch_size}")
        for key in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads",
                    "num_layers", "image_dim", "rope_max_seq_len"):
            if int(getattr(self, key)) < 1:
                raise WanConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.dim % self.num_heads:
            raise WanConfigError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise WanConfigError(f"head dim dim/num_heads = {self.head_dim} must be even and >= 6 (3D RoPE)")
        if self.freq_dim % 2:
            raise WanConfigError(f"freq_dim: must be even, got {self.freq_dim}")
        if self.window_size != (-1, -1):
            raise WanConfigError(f"window_size: only global attention (-1, -1) is supported, got {self.window_size}")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_branch(self) -> bool:
        """I2V / FLF2V: cross-attention also attends to CLIP image tokens."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels of the frame / height / width RoPE axes (128 -> 44, 42, 42)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def replace(self, **changes: Any) -> WanDiTConfig:
        return dataclasses.replace(self, **changes)

    # ---- released models ---------------------------------------------------------------------
    @classmethod
    def t2v_1_3b(cls) -> WanDiTConfig:
        """Wan2.1-T2V-1.3B."""
        return cls(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def t2v_14b(cls) -> WanDiTConfig:
        """Wan2.1-T2V-14B."""
        return cls(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def i2v_14b(cls) -> WanDiTConfig:
        """Wan2.1-I2V-14B-480P / 720P."""
        return cls(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    # ---- official config.json ----------------------------------------------------------------
    @classmethod
    def from_official(cls, data: dict[str, Any]) -> WanDiTConfig:
        """From an official ``config.json`` dict (unknown keys such as ``_class_name`` are ignored).

        Wan2.2's ``model_type`` ``"ti2v"`` (TI2V-5B) reads as ``"t2v"`` (no CLIP branch). Its ``"i2v"`` (A14B, no CLIP
        branch either) is the same string as Wan2.1 I2V's (with one): the checkpoint's tensors tell them apart
        (:func:`ditfleet.models.wan.find_checkpoint`), not this dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("model_type") == "ti2v":  # Wan2.2 TI2V-5B: no image branch (its image replaces a latent frame)
            kwargs["model_type"] = "t2v"
        missing = [k for k in ("dim", "num_heads", "num_layers") if k not in data]
        if missing:
            raise WanConfigError(f"official Wan config lacks {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise WanConfigError(str(e)) from None

    def published_cache_constants(self, family: str | None, height: int, width: int, use_ret_steps: bool):
        """``(TeaCache polynomial, MagCache ratios)`` published for this DiT shape (Wan2.1 T2V 1.3B / 14B, I2V 14B
        480p / 720p) at ``height x width`` pixels; each ``None`` where none is published."""
        from .cache_hooks import published_coefficients, published_mag_ratios

        return (published_coefficients(self, family, height, width, use_ret_steps),
                published_mag_ratios(self, family, height, width))

    def to_official(self) -> dict[str, Any]:
        """The official ``config.json`` dict (extension keys only where not at the official default)."""
        out: dict[str, Any] = {"_class_name": "WanModel", "_diffusers_version": "0.30.0"}
        for key in OFFICIAL_KEYS:
            out[key] = getattr(self, key)
        if self.model_type == "t2v" and self.in_dim > self.out_dim:  # image-conditioned without CLIP: Wan2.2 A14B I2V
            out["model_type"] = "i2v"
        for key, default in EXTENSION_DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    # ---- Diffusers config.json ---------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, data: dict[str, Any]) -> WanDiTConfig:
        """From a Diffusers ``WanTransformer3DModel`` ``config.json`` dict."""
        try:
            heads = int(data.get("num_attention_heads", 40))
            dim = heads * int(data.get("attention_head_dim", 128))
            qk = data.get("qk_norm", "rms_norm_across_heads")
            if qk not in ("rms_norm_across_heads", None):
                raise WanConfigError(f"qk_norm: {qk!r} is not supported (Wan2.1 uses 'rms_norm_across_heads')")
            added = data.get("added_kv_proj_dim")
            image_dim = data.get("image_dim")
            if added is not None and int(added) != dim:
                raise WanConfigError(f"added_kv_proj_dim: {added} != hidden size {dim} (Wan2.1 image keys are dim x dim)")
            if (added is None) != (image_dim is None):
                raise WanConfigError("image_dim and added_kv_proj_dim must be both set (I2V) or both null (T2V)")
            model_type = "t2v" if added is None else ("flf2v" if data.get("pos_embed_seq_len") else "i2v")
            if model_type == "flf2v" and int(data["pos_embed_seq_len"]) != 2 * CLIP_TOKENS:
                raise WanConfigError(f"pos_embed_seq_len: {data['pos_embed_seq_len']} is not {2 * CLIP_TOKENS}")
            in_dim = int(data.get("in_channels", 16))
            return cls(
                model_type=model_type,
                patch_size=tuple(data.get("patch_size", (1, 2, 2))),
                in_dim=in_dim,
                dim=dim,
                ffn_dim=int(data.get("ffn_dim", 13824)),
                freq_dim=int(data.get("freq_dim", 256)),
                text_dim=int(data.get("text_dim", 4096)),
                out_dim=int(data.get("out_channels") or in_dim),
                num_heads=heads,
                num_layers=int(data.get("num_layers", 40)),
                qk_norm=True,  # WanAttention always applies norm_q / norm_k, whatever qk_norm says
                cross_attn_norm=bool(data.get("cross_attn_norm", True)),
                eps=float(data.get("eps", 1e-6)),
                image_dim=int(image_dim) if image_dim is not None else 1280,
                rope_max_seq_len=int(data.get("rope_max_seq_len", 1024)),
            )
        except (TypeError, ValueError, KeyError) as e:
            if isinstance(e, WanConfigError):
                raise
            raise WanConfigError(f"Diffusers Wan config is not valid: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The Diffusers ``WanTransformer3DModel`` ``config.json`` dict."""
        if self.text_len != 512:
            raise WanConfigError(f"text_len: Diffusers' WanTransformer3DModel assumes 512 text tokens, got {self.text_len}")
        if not self.qk_norm:
            raise WanConfigError("qk_norm: Diffusers' WanTransformer3DModel always normalises q and k; qk_norm=false has no Diffusers form")
        image = self.has_image_branch
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim if image else None,
            "added_kv_proj_dim": self.dim if image else None,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": 2 * CLIP_TOKENS if self.model_type == "flf2v" else None,
        }
