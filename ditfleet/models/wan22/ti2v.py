"""The ``wan2.2`` family: Wan2.2 TI2V-5B, one 48-channel Wan DiT over the Wan2.2 VAE (4x16x16, 48 channels).

The DiT is the Wan DiT (:mod:`ditfleet.models.wan`) with ``in_dim = out_dim = 48``; Diffusers runs it with
``expand_timesteps`` (one timestep per token). For text-to-video every token carries the step's timestep, so
the DiT runs as is. Image-to-video (Diffusers' ``WanImageToVideoPipeline`` with ``expand_timesteps``) keeps the
channels and conditions by replacement instead: the image, VAE-encoded as a one-frame video, *is* the first latent
frame. At every step the model input is ``(1 - mask) * condition + mask * latents`` (``mask`` 0 on the first
latent frame, 1 elsewhere) and each token's timestep is ``mask * t`` (the first frame's tokens at t = 0: clean);
the sampler steps the latents it holds (their first frame is never read), and the final latents get the first
frame replaced before decoding (:meth:`Ti2vDiT.final_latents`).

:class:`Ti2vDiT` is the Wan DiT whose ``y`` carries that condition (``[B, 1 + 48, F, H, W]``: the mask, then the
condition latent) instead of extra input channels, so the engine's runner calls it like any DiT
(``dit(x, t, context, clip_fea=None, y=y)``); under sequence parallelism the per-token timesteps are split with
the tokens by the DiT itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..spec import Denoisers, ModelSpec
from ..wan.dit import DiTStep, WanDiT
from ..wan.spec import load_single

TI2V_CHANNELS = 48


def first_frame_condition(latent: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The TI2V image-to-video condition ``y`` from the image's latent.

    Args:
        latent: float32 ``[B, z, 1, h, w]`` the normalised latent of the image encoded as a one-frame video.
        latent_shape: ``(z, F, h, w)`` of the video's latents.

    Returns:
        float32 ``[B, 1 + z, F, h, w]``: channel 0 the mask (0 on the first latent frame: given; 1 elsewhere:
        generated), then the condition latent (``latent`` in frame 0, zeros elsewhere).
    """
    b, z, f1, h, w = latent.shape
    if f1 != 1 or (z, h, w) != (latent_shape[0], latent_shape[2], latent_shape[3]):
        raise ValueError(f"image latent {list(latent.shape)} does not fit the video latents {list(latent_shape)} "
                         "(one frame of the same channels and size expected)")
    frames = latent_shape[1]
    y = latent.new_zeros(b, 1 + z, frames, h, w, dtype=torch.float32)
    y[:, 0, 1:] = 1.0
    y[:, 1:, :1] = latent.float()
    return y


def _split(y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if y.dim() != 5 or y.shape[1] != x.shape[1] + 1 or y.shape[2:] != x.shape[2:] or y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"TI2V condition y {list(y.shape)} does not fit the latents {list(x.shape)} "
                         f"(expected [B, 1 + {x.shape[1]}, F, H, W]: the mask, then the condition latent)")
    return y[:, :1].to(x.dtype), y[:, 1:].to(x.dtype)


def apply_condition(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * condition + mask * x``: the latents ``x`` ``[B, z, F, H, W]`` with the given frames of
    ``y`` (:func:`first_frame_condition`) in place; ``x``'s dtype."""
    mask, cond = _split(y, x)
    return (1 - mask) * cond + mask * x


def token_timesteps(t: torch.Tensor, y: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps ``mask * t``: float32 ``[B, f*h*w]`` over the patch grid in raster order (each patch's
    first latent position's mask, as Diffusers), from ``t`` ``[B]`` (or one value) and ``y`` ``[B | 1, 1 + z, F, H, W]``."""
    pt, ph, pw = patch
    mask = y[:, 0, ::pt, ::ph, ::pw].float().flatten(1)  # [B | 1, S]
    t = t.float().reshape(-1, 1).to(mask.device)
    if t.shape[0] != mask.shape[0] and 1 not in (t.shape[0], mask.shape[0]):
        raise ValueError(f"batch sizes disagree: t {t.shape[0]}, y {mask.shape[0]}")
    return mask * t


class Ti2vDiT(WanDiT):
    """The TI2V-5B DiT: a Wan DiT whose ``y`` is the first-frame condition (not extra input channels).

    ``forward(x, t, context, y=None)``: text-to-video without ``y``; image-to-video with ``y``
    ``[B | 1, 1 + out_dim, F, H, W]`` (:func:`first_frame_condition`): the model sees
    :func:`apply_condition` ``(x, y)`` at the per-token timesteps :func:`token_timesteps` (first-frame
    tokens at 0). The velocity it returns covers every frame (the first frame's is never used: the sampler's
    first frame is replaced before decoding, :meth:`final_latents`).
    """

    def prepare(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
                y: torch.Tensor | None = None, *, step: int | None = None) -> DiTStep:
        """As :meth:`WanDiT.prepare`, with ``y`` the first-frame condition (see the class)."""
        if y is not None:
            x, t = apply_condition(x, y), token_timesteps(t, y, self.config.patch_size)
        return super().prepare(x, t, context, clip_fea, None, step=step)

    @staticmethod
    def image_condition(latent: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
        """The ``y`` of an image-to-video request (:func:`first_frame_condition`)."""
        return first_frame_condition(latent, latent_shape)

    @staticmethod
    def final_latents(latents: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The latents the VAE decodes: the sampler's with the given first frame in place (``y`` None: as they are)."""
        return latents if y is None else apply_condition(latents, y.to(latents.device))


class Wan22Ti2vSpec(ModelSpec):
    family = "wan2.2"
    description = "Wan2.2 TI2V-5B: one 48-channel DiT over the Wan2.2 VAE"
    experts = 1
    #: image-to-video conditions by replacing the first latent frame (no extra DiT input channels, no CLIP)
    first_frame_i2v = True
    dit_class = Ti2vDiT
    quantized_ckpt_keys = ("dit_quantized_ckpt",)

    def claims(self, root: Path) -> bool:
        try:
            index = json.loads((root / "model_index.json").read_text())
        except (OSError, ValueError):
            index = {}
        if isinstance(index, dict) and index.get("expand_timesteps"):
            return True
        try:
            vae = json.loads((root / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(vae, dict) and int(vae.get("z_dim") or 0) == TI2V_CHANNELS

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")]

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=(), quantized=(), quant: str | None = None) -> Denoisers:
        return load_single(self, root, device=device, dtype=dtype, attention=attention, boundary=boundary, loras=loras,
                           quantized=quantized, quant=quant)
