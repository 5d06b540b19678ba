"""``ModelRunner``: the DiT and the sampler of one rank; ``denoise(encoded request) -> latents``.

One runner lives in every process of a run (a world of one here; one per GPU under torchrun or
Ray). Each holds the whole DiT (sequence parallelism splits tokens, not weights) and runs the
same loop with the same numbers, so every rank ends with the same latents:

* the noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` as float32
  ``[1, 16, F', H/8, W/8]`` -- Diffusers' ``randn_tensor`` semantics with a CPU generator, hence
  the same on every rank, device and machine (the official script draws on the GPU instead);
* classifier-free guidance runs the conditional and unconditional passes one after the other
  (``cfg_size`` 1; or as one batch of 2 with ``cfg_batch=True``), or one branch per cfg rank
  with an all-gather (``parallel.cfg_p_size`` 2), through :mod:`ditfleet.parallel.cfg`; the guided
  velocity ``uncond + scale * (cond - uncond)`` is formed in float32;
* the sampler (:mod:`.sampler`) steps in float32 on identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from ..models.attention_policy import build_policy
from ..models.spec import Denoisers
from ..parallel import ParallelMesh, cfg_combine, cfg_exchange, cfg_predict, cfg_select
from .request import EncodedRequest
from .sampler import FlowSampler, make_sampler


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[1, *shape]`` standard normal noise from a CPU generator seeded with ``seed``, moved to ``device``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=gen, dtype=torch.float32).to(device)


class ModelRunner:
    """The denoising loop of one rank.

    Args:
        dit: a :class:`~ditfleet.models.wan.WanDiT` with its attention kernels set (and, under
            sequence parallelism, ``set_parallel(mesh)`` called), or the :class:`~ditfleet.models.spec.Denoisers`
            of a family with experts: at each step :meth:`denoiser_for` picks the expert (Wan2.2 A14B).
        mesh: the parallel mesh; ``None`` is a world of one.
        cfg_batch: with ``cfg_size`` 1, run both CFG branches as one batch of 2 (True) or one
            after the other (False, the default: half the activation memory, and faster at the sizes users
            run -- 14B 720p x 81 FA4 on one H200, one process: 19.53 s per step vs 20.19 s batched,
            ``benchmarks/results/profile_step_h200_1gpu_52d530f.json``).
        schedule: sigma grid of the sampler, ``"wan"`` (official) or ``"diffusers"``.
    """

    def __init__(self, dit, *, mesh: ParallelMesh | None = None, cfg_batch: bool = False, schedule: str = "wan"):
        self.denoisers = dit if isinstance(dit, Denoisers) else Denoisers([dit], ["dit"])
        self.dit = self.denoisers.primary  # the first expert: device, config and reports
        self.family = getattr(dit, "family", None)
        self.mesh = mesh or ParallelMesh()
        self.cfg_batch = cfg_batch
        self.schedule = schedule

    @classmethod
    def load(
        cls,
        model_path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention: Mapping[str, object],
        mesh: ParallelMesh | None = None,
        radial=None,
        spec=None,
        boundary: float | None = None,
        loras=(),
        quant: str | None = None,
        **kwargs,
    ) -> ModelRunner:
        """Load the denoiser(s) of ``model_path`` through its family's spec and wrap them.

        ``radial``: the run's ``RadialAttnSetting`` (in every expert's self-attention policy; used when the kernel
        is radial); ``spec``:
        the :class:`~ditfleet.models.spec.ModelSpec` (``None``: the folder's family); ``boundary``: the expert
        switch of a two-expert family (``None``: the folder's); ``quant``: the ``dit_quant_scheme`` of a
        ``dit_quantized`` run (``None``: the compute dtype), applied once after the LoRAs are merged.
        """
        from pathlib import Path

        from ..models.registry import resolve_family

        root = Path(model_path)
        spec = spec or resolve_family(None, root)
        den = spec.load(root, device=device, dtype=dtype, attention={k: v for k, v in attention.items() if v is not None},
                        boundary=boundary, loras=loras or ())
        if quant is not None:
            from ..models.quant import quantize_denoisers_

            quantize_denoisers_(den, quant)
        for dit in den:  # each expert its own policy (bind_sparge replaces a Sparge one with its bound layers)
            c = dit.config
            dit.set_policy(build_policy(dit.policy.kernel, num_layers=c.num_layers, num_heads=c.num_heads, radial=radial))
            if mesh is not None and mesh.sp_size > 1:
                dit.set_parallel(mesh)
        runner = cls(den, mesh=mesh, **kwargs)
        runner.family = spec.family
        return runner

    @property
    def device(self) -> torch.device:
        return self.dit.device

    def sampler(self, enc: EncodedRequest) -> FlowSampler:
        return make_sampler(enc.solver, enc.steps, enc.shift, schedule=self.schedule, step_list=enc.step_list)

    def denoiser_for(self, t: torch.Tensor) -> tuple[int, object]:
        """``(expert index, model)`` that denoises at timestep ``t`` (the same on every rank: same ``t``)."""
        i = self.denoisers.index_for(t)
        return i, self.denoisers.experts[i]

    def predict(self, x: torch.Tensor, t: torch.Tensor, enc: EncodedRequest) -> torch.Tensor:
        """The (guided) velocity at ``x``, ``t``: float32 like ``x``, identical on every rank."""
        i, dit = self.denoiser_for(t)

        def model(x, t, context, clip_fea, y):
            return dit(x, t.expand(x.shape[0]), context, clip_fea=clip_fea, y=y)

        if not enc.enable_cfg:
            return model(x, t, enc.context, enc.clip_fea, enc.y)
        mesh = self.mesh
        if mesh.cfg_size == 1 and not self.cfg_batch:
            cond = dict(x=x, t=t, context=enc.context, clip_fea=enc.clip_fea, y=enc.y)
            cond_v, uncond_v = cfg_predict(model, cond, {**cond, "context": enc.context_null}, mesh)
        else:  # batch of 2 (cfg_size 1) or this rank's branch (cfg_size 2)

            def sel(a):
                return None if a is None else cfg_select(a, a, mesh)

            ctx = cfg_select(enc.context, enc.context_null, mesh)
            cond_v, uncond_v = cfg_exchange(model(sel(x), t, ctx, sel(enc.clip_fea), sel(enc.y)), mesh)
        return cfg_combine(cond_v, uncond_v, enc.scale_for(i))

    @torch.inference_mode()
    def denoise_iter(
        self, enc: EncodedRequest, *, noise: torch.Tensor | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Run the sampling steps one at a time (what engines stream progress from).

        Args:
            enc: the encoded request (tensors on any device: moved here).
            noise: the initial latents; default :func:`initial_noise` of ``enc.seed``.

        Yields:
            ``(step index, steps, latents after the step)``; the last latents are the result.
        """
        device = self.device
        enc = enc.to(device)
        x = (noise if noise is not None else initial_noise(enc.latent_shape, enc.seed)).to(device, torch.float32)
        sampler = self.sampler(enc)
        for i, t in enumerate(sampler.timesteps):
            for dit in self.denoisers:
                dit.set_step(i)  # radial attention runs dense for the first dense_timesteps steps
            v = self.predict(x, t.reshape(1).to(device), enc)
            x = sampler.step(v.float(), x)
            yield i, len(sampler), x

    @torch.inference_mode()
    def denoise(
        self,
        enc: EncodedRequest,
        *,
        noise: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Run every sampling step.

        Args:
            enc: the encoded request (tensors on any device: moved here).
            noise: the initial latents; default :func:`initial_noise` of ``enc.seed``.
            progress: called with ``(step index, steps)`` after each step.

        Returns:
            float32 ``[1, 16, F', h, w]`` final latents (normalised, as the VAE's input after denormalising).
        """
        x = None
        for i, n, x in self.denoise_iter(enc, noise=noise):
            if progress is not None:
                progress(i, n)
        return x
