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
* the sampler (:mod:`.sampler`) steps in float32 on identical inputs;
* step caching (``feature_caching``, :meth:`ModelRunner.set_step_cache`): each forward goes through
  :func:`ditfleet.models.step_cache.cached_forward`, which runs the blocks or reuses the branch's cached
  residual. The state is per CFG branch (and expert); with caching on and ``cfg_size`` 1 the branches run one
  after the other (a batch of 2 would tie their decisions). Decisions over per-token statistics are reduced
  over the SP group, so every rank of a branch skips the same steps; :meth:`ModelRunner.cache_report` lists
  the computed and skipped steps of both branches (gathered over the cfg ranks under cfg-parallel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from ..errors import ConfigError
from ..models.attention_policy import build_policy
from ..models.spec import Denoisers
from ..models.step_cache import COND, UNCOND, StepCache, StepCacheSettings, cached_forward, run_constants, sp_sum
from ..parallel import ParallelMesh, cfg_branch, cfg_combine, cfg_exchange, cfg_predict, cfg_select
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
        self.cache_settings = StepCacheSettings()  # none: set_step_cache
        self._cache: StepCache | None = None  # the running (or last) denoise's cache
        self._cache_records: dict[int, list[bool]] | None = None

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
        quantized=None,
        step_cache: StepCacheSettings | None = None,
        **kwargs,
    ) -> ModelRunner:
        """Load the denoiser(s) of ``model_path`` through its family's spec and wrap them.

        ``radial``: the run's ``RadialAttnSetting`` (in every expert's self-attention policy; used when the kernel
        is radial); ``spec``:
        the :class:`~ditfleet.models.spec.ModelSpec` (``None``: the folder's family); ``boundary``: the expert
        switch of a two-expert family (``None``: the folder's); ``quant``: the ``dit_quant_scheme`` of a
        ``dit_quantized`` run (``None``: the compute dtype), applied once after the LoRAs are merged;
        ``quantized``: per denoiser (``spec.dit_folders`` order) its pre-quantised file or ``None`` (the run's
        ``dit_quantized_ckpt`` / ``high_noise_quantized_ckpt`` / ``low_noise_quantized_ckpt``, with ``quant``): the
        family's spec builds those denoisers from their files, the others are quantised at load;
        ``step_cache``: the run's ``feature_caching`` settings (:meth:`set_step_cache`; ``None``: no caching).
        """
        from pathlib import Path

        from ..models.registry import resolve_family

        root = Path(model_path)
        spec = spec or resolve_family(None, root)
        extra = {}
        if quantized is not None and any(p is not None for p in quantized):
            keys = spec.quantized_ckpt_keys
            if len(keys) != len(quantized):
                given = "dit_quantized_ckpt" if len(quantized) == 1 else "high_noise_quantized_ckpt"
                raise ConfigError(given, f"{spec.family} ({spec.description}) "
                                  + (f"takes {' / '.join(keys)}" if keys else "does not load pre-quantised checkpoints")
                                  + f"; got {len(quantized)} file(s)")
            if quant is None:
                key = next(k for k, p in zip(keys, quantized) if p is not None)
                raise ConfigError(key, "a pre-quantised checkpoint needs dit_quantized: true (and an fp8 "
                                       "dit_quant_scheme)")
            extra = {"quantized": [None if p is None else Path(p) for p in quantized], "quant": quant}
        den = spec.load(root, device=device, dtype=dtype, attention={k: v for k, v in attention.items() if v is not None},
                        boundary=boundary, loras=loras or (), **extra)
        if quant is not None:  # the experts not built pre-quantised are quantised here; the report covers all
            from ..models.quant import quantize_denoisers_

            quantize_denoisers_(den, quant)
        for dit in den:  # each expert its own policy (bind_sparge replaces a Sparge one with its bound layers)
            c = dit.config
            dit.set_policy(build_policy(dit.policy.kernel, num_layers=c.num_layers, num_heads=c.num_heads, radial=radial))
            if mesh is not None and mesh.sp_size > 1:
                dit.set_parallel(mesh)
        runner = cls(den, mesh=mesh, **kwargs)
        runner.family = spec.family
        if step_cache is not None:
            runner.set_step_cache(step_cache)
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

    # ---- step caching -----------------------------------------------------------------------------
    def set_step_cache(self, settings: StepCacheSettings) -> ModelRunner:
        """Use ``settings`` (``feature_caching`` and its keys) in the following denoising runs.

        Raises:
            ConfigError: a denoiser cannot be cached (no staged forward), or a rule needs constants this model
                has none published for (``coefficients`` for Tea, ``magcache_ratios`` for Mag) and none are given.
        """
        if settings.active:
            for dit in self.denoisers:
                if getattr(dit, "staged_forward", None) is None:
                    raise ConfigError("feature_caching", f"{settings.method}: the denoiser ({type(dit).__name__}) does "
                                                         "not expose its blocks to a step cache (no staged_forward); "
                                                         "use none")
            # Wan2.1 I2V has constants for both resolutions, so the request's size cannot miss them: check now.
            self._constants(settings, (60, 104))
        self.cache_settings = settings
        return self

    def _constants(self, s: StepCacheSettings, latent_hw: tuple[int, int]):
        """``(Tea polynomial, Mag ratios)`` of a run with latents ``latent_hw = (h, w)``: the settings', else the
        ones the model publishes (``published_cache_constants``); ConfigError when neither has them."""
        published = getattr(self.dit, "published_cache_constants", None)
        pub = published(self.family, latent_hw, s.use_ret_steps) if published else None
        return run_constants(s, self.dit.config, self.family, pub)

    def _start_cache(self, enc: EncodedRequest, steps: int) -> None:
        self._cache_records = None
        s = self.cache_settings
        if not s.active:
            self._cache = None
            return
        coeffs, ratios = self._constants(s, (enc.latent_shape[2], enc.latent_shape[3]))
        self._cache = StepCache(s, steps, coefficients=coeffs, mag_ratios=ratios, reduce=sp_sum(self.mesh))

    def _finish_cache(self, enc: EncodedRequest) -> None:
        """Both branches' decisions on every rank: under cfg-parallel each cfg rank ran one, so gather them."""
        cache = self._cache
        if cache is None:
            return
        branches = [COND, UNCOND] if enc.enable_cfg else [COND]
        if enc.enable_cfg and self.mesh.cfg_size == 2:
            mine = torch.tensor(cache.decisions(cfg_branch(self.mesh)), dtype=torch.int32, device=self.device)
            cond, uncond = cfg_exchange(mine, self.mesh)
            self._cache_records = {COND: [bool(v) for v in cond.tolist()], UNCOND: [bool(v) for v in uncond.tolist()]}
        else:
            self._cache_records = {b: cache.decisions(b) for b in branches}
        cache.release()  # the residuals are not needed past the last step (the records make the report)

    def cache_report(self) -> dict:
        """The last run's caching: method, settings, computed vs skipped steps per branch (``{"feature_caching":
        "none"}`` without caching)."""
        if self._cache is None:
            return {"feature_caching": "none"}
        return self._cache.report(self._cache_records)

    def cache_decisions(self) -> dict[str, list[bool]]:
        """``computed`` per step of each branch in the last run (``{}`` without caching)."""
        if self._cache is None:
            return {}
        records = self._cache_records or {b: self._cache.decisions(b) for b in sorted(self._cache.records)}
        return {("cond", "uncond")[b]: list(v) for b, v in records.items()}

    def predict(self, x: torch.Tensor, t: torch.Tensor, enc: EncodedRequest, step: int | None = None) -> torch.Tensor:
        """The (guided) velocity at ``x``, ``t`` (denoising step ``step``, for the step cache): float32 like ``x``,
        identical on every rank."""
        i, dit = self.denoiser_for(t)
        cache = self._cache
        if cache is not None and i > 0:
            cache.release(i - 1)  # a two-expert run never returns to the expert before

        def model(x, t, context, clip_fea, y, branch=COND):
            t = t.expand(x.shape[0])
            if cache is None:
                return dit(x, t, context, clip_fea=clip_fea, y=y)
            return cached_forward(dit.staged_forward(x, t, context, clip_fea, y), cache, i, branch, step)

        if not enc.enable_cfg:
            return model(x, t, enc.context, enc.clip_fea, enc.y)
        mesh = self.mesh
        if cache is not None or (mesh.cfg_size == 1 and not self.cfg_batch):  # one branch per call (per cfg rank)
            cond = dict(x=x, t=t, context=enc.context, clip_fea=enc.clip_fea, y=enc.y)
            cond_v, uncond_v = cfg_predict(model, cond, {**cond, "context": enc.context_null, "branch": UNCOND}, mesh)
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
        self._start_cache(enc, len(sampler))
        try:
            for i, t in enumerate(sampler.timesteps):
                for dit in self.denoisers:
                    dit.set_step(i)  # radial attention runs dense for the first dense_timesteps steps
                v = self.predict(x, t.reshape(1).to(device), enc, step=i)
                x = sampler.step(v.float(), x)
                if i == len(sampler) - 1:
                    self._finish_cache(enc)
                yield i, len(sampler), x
        finally:  # also a cancelled or failed run: no cached tensor outlives it
            if self._cache is not None:
                self._cache.release()

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
            float32 ``[1, z, F', h, w]`` final latents (normalised, as the VAE's input after denormalising; ``z`` the
            VAE's latent channels: 16, or 48 for Wan2.2 TI2V-5B).
        """
        x = None
        for i, n, x in self.denoise_iter(enc, noise=noise):
            if progress is not None:
                progress(i, n)
        return x
