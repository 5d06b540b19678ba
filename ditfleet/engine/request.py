"""What one generation asks for (:class:`GenerateRequest`) and what the DiT ranks receive (:class:`EncodedRequest`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .errors import RequestError


@dataclass
class GenerateRequest:
    """One video to generate.

    Attributes:
        prompt: the text prompt.
        negative_prompt: the CFG negative prompt; ``None`` = the official Wan2.1 default.
        image: I2V reference image path (``None`` for T2V).
        seed: noise seed.
        frames: video length, 4n + 1.
        height, width: pixels, multiples of 16.
        output: ``.mp4``, ``.npy``, or a folder (PNG frames).
        steps: denoising steps.
        shift: flow shift.
        guide_scale: CFG scale, or ``(high-noise, low-noise)`` scales of a two-expert model (Wan2.2 A14B).
        enable_cfg: two passes per step (False: one, conditional only).
        solver: ``"unipc"`` or ``"euler"``.
        step_list: a step-distilled model's timesteps (``denoising_step_list``; ``steps`` is its length), or ``None``.
        fps: mp4 frame rate.
        label: how logs and summaries name it (e.g. ``jobs.jsonl:3``).
        overwrite: allow replacing an output ditfleet did not write (``--overwrite``; a PNG folder keeps
            its files that are not frame files).
    """

    prompt: str
    output: str
    negative_prompt: str | None = None
    image: str | None = None
    seed: int = 42
    frames: int = 81
    height: int = 480
    width: int = 832
    steps: int = 50
    shift: float = 5.0
    guide_scale: float | tuple[float, float] = 5.0
    enable_cfg: bool = True
    solver: str = "unipc"
    step_list: tuple[int, ...] | None = None
    fps: int = 16
    label: str = "request"
    overwrite: bool = False

    def replace(self, **changes) -> GenerateRequest:
        return dataclasses.replace(self, **changes)

    def validate(self, task: str, *, spatial_multiple: int = 16) -> None:
        """Raise :class:`RequestError` naming the first invalid field."""
        where = f"{self.label}: " if self.label != "request" else ""
        if not isinstance(self.prompt, str):
            raise RequestError(f"{where}prompt: expected a string, got {self.prompt!r}")
        n = self.frames
        if n < 1 or (n - 1) % 4:
            lo = max(1, (n - 1) // 4 * 4 + 1)
            raise RequestError(f"{where}frames: must be 4n+1 (1, 5, 9, ..., 81), got {n}; nearest valid: {lo} or {lo + 4}")
        for key in ("height", "width"):
            v = getattr(self, key)
            if v <= 0 or v % spatial_multiple:
                near = max(spatial_multiple, round(v / spatial_multiple) * spatial_multiple)
                raise RequestError(f"{where}{key}: must be a positive multiple of {spatial_multiple}, got {v}; nearest valid: {near}")
        if self.steps < 1:
            raise RequestError(f"{where}steps: must be >= 1, got {self.steps}")
        if not 0 <= self.seed < 2**63:
            raise RequestError(f"{where}seed: must lie in [0, 2**63), got {self.seed}")
        if self.step_list is not None and len(self.step_list) != self.steps:
            raise RequestError(f"{where}steps: {self.steps}, but denoising_step_list {list(self.step_list)} has "
                               f"{len(self.step_list)}; make infer_steps equal its length")
        g = self.guide_scale
        scales = list(g) if isinstance(g, (tuple, list)) else [g]
        if (isinstance(g, (tuple, list)) and len(scales) != 2) or any(not isinstance(x, (int, float)) or x < 0 for x in scales):
            raise RequestError(f"{where}guide_scale: must be a number >= 0 or [high_noise, low_noise] (two numbers "
                               f">= 0), got {g!r}")
        if self.solver not in ("unipc", "euler"):
            raise RequestError(f"{where}sample_solver: {self.solver!r} is not valid; valid: unipc, euler")
        if self.fps < 1:
            raise RequestError(f"{where}fps: must be >= 1, got {self.fps}")
        if task == "i2v" and not self.image:
            raise RequestError(f"{where}task i2v needs a reference image: set image_path in the config, --image, "
                               "or \"image\" in the jobs line")
        if task == "t2v" and self.image:
            raise RequestError(f"{where}image {self.image!r} given, but task is t2v; set task to i2v (with an I2V model) "
                               "or drop the image")


@dataclass
class EncodedRequest:
    """Everything the denoising ranks need, as plain tensors and numbers (broadcastable as is).

    Attributes:
        context: ``[1, text_len, text_dim]`` prompt features (zero past the prompt).
        context_null: negative-prompt features, same shape; ``None`` when CFG is off.
        clip_fea: I2V ``[1, 257, image_dim]`` CLIP features, else ``None``.
        y: I2V ``[1, 4 + 16, F', h, w]`` mask + image latent (DiT input channels); Wan2.2 TI2V-5B ``[1, 1 + 48, F',
            h, w]`` mask + first-frame condition latent (:func:`ditfleet.models.wan22.ti2v.first_frame_condition`);
            else ``None``.
        latent_shape: ``(z, F', h, w)`` (``z`` 16, or 48 for TI2V-5B).
        seed, steps, shift, guide_scale, enable_cfg, solver: sampling settings (``guide_scale``: one scale, or
            one per expert, high noise first).
    """

    context: torch.Tensor
    context_null: torch.Tensor | None
    clip_fea: torch.Tensor | None
    y: torch.Tensor | None
    latent_shape: tuple[int, int, int, int]
    seed: int
    steps: int
    shift: float
    guide_scale: float | tuple[float, float]
    enable_cfg: bool
    solver: str = "unipc"
    step_list: tuple[int, ...] | None = None
    meta: dict = field(default_factory=dict)

    def scale_for(self, expert: int) -> float:
        """The CFG scale of expert ``expert`` (0: high noise, 1: low noise); one scale serves every expert."""
        g = self.guide_scale
        return float(g[expert]) if isinstance(g, (tuple, list)) else float(g)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"context": self.context, "context_null": self.context_null, "clip_fea": self.clip_fea, "y": self.y}

    def to(self, device: torch.device | str) -> EncodedRequest:
        moved = {k: (None if v is None else v.to(device)) for k, v in self.tensors().items()}
        return dataclasses.replace(self, **moved)
