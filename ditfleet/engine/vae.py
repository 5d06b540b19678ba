"""The Wan VAE (Diffusers ``AutoencoderKLWan``): I2V conditioning in, streamed frames out.

Latents are normalised as Diffusers' Wan pipelines do: ``(z - latents_mean) * (1 / latents_std)``
after encoding, the inverse before decoding. Time is compressed 4x causally (``4n + 1`` frames
<-> ``n + 1`` latent frames: the first latent frame holds the first frame alone), space 8x.

Decoding streams: the causal decoder runs one latent frame at a time with a cache of the last
frames' features (as ``AutoencoderKLWan._decode`` does internally), and each step's output
frames (1 for the first latent frame, 4 after) are clamped, turned into uint8 and handed to the
writer at once, so a long video never holds all its frames in memory. The frames are identical
to a whole-video ``decode``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ._libs import quiet_libraries


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, n, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]`` (``round((x + 1) / 2 * 255)``)."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class WanVAE:
    """Wrapper of one ``AutoencoderKLWan`` (float32 by default, like the official pipeline)."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.scale_t = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        self.scale_s = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, self.z_dim, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, self.z_dim, 1, 1, 1)

    @classmethod
    def load(cls, folder: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32) -> WanVAE:
        """Load ``vae/`` of a Diffusers Wan folder."""
        from diffusers import AutoencoderKLWan

        with quiet_libraries():
            vae = AutoencoderKLWan.from_pretrained(str(Path(folder) / "vae"), torch_dtype=dtype)
        return cls(vae.to(device).eval().requires_grad_(False))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z_dim, (frames - 1) // 4 + 1, height // 8, width // 8)``."""
        return (self.z_dim, (frames - 1) // self.scale_t + 1, height // self.scale_s, width // self.scale_s)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.device, z.dtype)) * self.inv_std.to(z.device, z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.inv_std.to(z.device, z.dtype) + self.mean.to(z.device, z.dtype)

    # ---- I2V conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_condition(self, image: torch.Tensor, frames: int) -> torch.Tensor:
        """The 20 conditioning channels of I2V: 4 mask channels + the normalised latent of the image video.

        As Diffusers' ``WanImageToVideoPipeline.prepare_latents`` and the official I2V: the video
        ``[image, 0, 0, ...]`` (``frames`` long) is encoded (posterior mode), normalised, and a mask
        marks the first frame known: its 4 channels are the 4 pixel frames packed in each latent
        frame (the first latent frame's 4 are all the first frame, so all 1; every other 0).

        Args:
            image: ``[1, 3, H, W]`` in [-1, 1].
            frames: video length (4n + 1).

        Returns:
            float32 ``[1, 4 + z_dim, (frames - 1) // 4 + 1, H / 8, W / 8]``.
        """
        b, _, h, w = image.shape
        video = torch.cat([image.unsqueeze(2), image.new_zeros(b, 3, frames - 1, h, w)], dim=2)
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        latent = self.normalize(posterior.mode().float())
        mask = torch.zeros(b, self.scale_t, latent.shape[2], latent.shape[3], latent.shape[4], device=latent.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised latent of one image encoded as a one-frame video (posterior mode): the first latent
        frame of a Wan2.2 TI2V-5B image-to-video run (Diffusers' ``prepare_latents`` with ``expand_timesteps``).

        Args:
            image: ``[1, 3, H, W]`` in [-1, 1].

        Returns:
            float32 ``[1, z_dim, 1, H / scale_s, W / scale_s]``.
        """
        posterior = self.vae.encode(image.unsqueeze(2).to(self.device, self.dtype)).latent_dist
        return self.normalize(posterior.mode().float())

    # ---- decoding ---------------------------------------------------------------------------------
    def _can_stream(self) -> bool:
        vae = self.vae
        if not hasattr(vae, "clear_cache") or getattr(vae, "use_tiling", False):
            return False
        params = inspect.signature(vae.decoder.forward).parameters
        return "feat_cache" in params and "feat_idx" in params

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Decode normalised latents ``[1, z_dim, F', h, w]`` frame chunk by frame chunk.

        Yields:
            uint8 ``[n, H, W, 3]``: 1 frame for the first latent frame, then 4 per latent frame.
        """
        vae = self.vae
        z = self.denormalize(latents.float()).to(self.device, self.dtype)
        if not self._can_stream():  # other Diffusers versions / tiling: decode whole, still yield in chunks
            video = vae.decode(z, return_dict=False)[0]
            yield to_uint8(video[:, :, :1])
            for s in range(1, video.shape[2], self.scale_t):
                yield to_uint8(video[:, :, s : s + self.scale_t])
            return
        first_chunk = "first_chunk" in inspect.signature(vae.decoder.forward).parameters
        patch = getattr(vae.config, "patch_size", None)
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                kwargs = {"first_chunk": True} if (first_chunk and i == 0) else {}
                out = vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs)
                if patch is not None:
                    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                    out = unpatchify(out, patch_size=patch)
                yield to_uint8(torch.clamp(out, -1.0, 1.0))
        finally:
            vae.clear_cache()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode whole: uint8 ``[F, H, W, 3]`` (tests; generation streams with :meth:`decode_stream`)."""
        return np.concatenate(list(self.decode_stream(latents)), axis=0)
