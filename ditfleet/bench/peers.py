"""Peers of ``ditfleet bench step``: other libraries' whole CFG step on the same shapes and weights.

* Diffusers: ``WanTransformer3DModel`` sharing the ditfleet DiT's weights (renamed by
  :func:`ditfleet.bench.dit.build_diffusers`; the few parameters Diffusers keeps in another dtype are
  cast copies). One step is what ``WanPipeline`` runs: the conditional and the unconditional pass
  one after the other (batch 1 each), the guidance combine, then the sampler step (ditfleet's
  sampler, the same float32 math for both sides, so the comparison is the DiT's). Over several
  processes Diffusers' own context parallelism runs (``ContextParallelConfig(ring_degree,
  ulysses_degree)`` and ``enable_parallelism``; its mesh is built by Diffusers over the whole world).
  Attention runs through Diffusers' torch SDPA backends (:func:`attention_backend`: ``_native_cudnn`` for
  ``--diffusers-kernel cudnn`` on a GPU, the cuDNN kernel ``bench dit --diffusers`` runs; ``native`` on the CPU).
* xfuser (xDiT): recorded as installed or not; its Wan USP is not driven yet (see :func:`xfuser_status`).

A peer that cannot run says why (its record's ``why``); nothing here raises for a missing package.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import torch

from ..engine.request import EncodedRequest
from ..engine.sampler import make_sampler
from ..parallel import cfg_combine

#: ``--diffusers-kernel`` values (see :func:`attention_backend`).
DIFFUSERS_KERNELS = ("cudnn", "flash", "efficient", "default")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def diffusers_unavailable(context_parallel: bool) -> str | None:
    """Why the Diffusers peer cannot run here (``None``: it can be tried).

    Args:
        context_parallel: whether its context parallelism is needed (a layout over several processes).
    """
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        return f"diffusers not importable: {e}"
    if not context_parallel:
        return None
    try:
        from diffusers import ContextParallelConfig  # noqa: F401
    except ImportError as e:
        return f"diffusers {_version('diffusers')} has no ContextParallelConfig ({e})"
    if not hasattr(WanTransformer3DModel, "enable_parallelism") or not getattr(WanTransformer3DModel, "_cp_plan", None):
        return f"diffusers {_version('diffusers')}: WanTransformer3DModel has no enable_parallelism / _cp_plan"
    return None


def attention_backend(kind: str, device: torch.device) -> str:
    """Diffusers' attention backend for ``--diffusers-kernel`` ``kind`` on ``device``: its torch SDPA backends
    (``_native_cudnn`` and ``_native_flash`` return the LSE its ring needs); ``native`` on the CPU and for
    ``default``."""
    if device.type != "cuda" or kind == "default":
        return "native"
    return {"cudnn": "_native_cudnn", "flash": "_native_flash", "efficient": "_native_efficient"}[kind]


class DiffusersStep:
    """Diffusers' Wan DiT on ``model``'s weights, stepping like :meth:`ModelRunner.denoise_iter`.

    Args:
        model: the ditfleet :class:`~ditfleet.models.wan.WanDiT` whose weights it shares.
        dtype: compute dtype (the model's).
        kernel: one of :data:`DIFFUSERS_KERNELS` (see :func:`attention_backend`).
        ring, ulysses: Diffusers' context-parallel degrees; ``1, 1`` runs the plain model (one process).
            Anything else is a collective (every rank builds its peer together): Diffusers builds a
            ``(ring, ulysses)`` device mesh over the whole world.
    """

    def __init__(self, model, dtype: torch.dtype, *, kernel: str = "cudnn", ring: int = 1, ulysses: int = 1):
        from .dit import build_diffusers

        if kernel not in DIFFUSERS_KERNELS:
            raise ValueError(f"diffusers kernel must be one of {DIFFUSERS_KERNELS}, got {kernel!r}")
        self.device, self.kernel = model.device, kernel
        self.dm = build_diffusers(model, dtype)
        self.backend = attention_backend(kernel, model.device)
        self.dm.set_attention_backend(self.backend)
        self.parallel = None
        if ring * ulysses > 1:
            from diffusers import ContextParallelConfig

            self.parallel = {"ring_degree": ring, "ulysses_degree": ulysses}
            try:
                self.dm.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
            except ZeroDivisionError as e:  # diffusers 0.42: device = rank % torch.accelerator.device_count()
                if torch.accelerator.device_count():
                    raise
                raise RuntimeError(f"diffusers {_version('diffusers')} enable_parallelism needs an accelerator: it "
                                   "picks its device as rank % torch.accelerator.device_count(), which is 0 on this "
                                   f"CPU-only machine ({type(e).__name__}: {e})") from None

    def describe(self) -> dict:
        """What runs: Diffusers' version, attention, and its context-parallel degrees (``None``: one process)."""
        return {"version": _version("diffusers"), "attention_backend": self.backend,
                "context_parallel": self.parallel,
                "cfg_passes": "conditional and unconditional passes one after the other, batch 1 (as WanPipeline)"}

    def velocity(self, x: torch.Tensor, t: torch.Tensor, enc: EncodedRequest) -> torch.Tensor:
        """Guided velocity at latents ``x`` (float32 ``[1, 16, F, H, W]``), timestep ``t`` (one value); float32."""
        dtype = self.dm.proj_out.weight.dtype
        h = (x if enc.y is None else torch.cat([x, enc.y.to(x.dtype)], dim=1)).to(dtype)
        tt = t.reshape(1)
        clip = None if enc.clip_fea is None else enc.clip_fea.to(dtype)
        cond = self.dm(h, tt, enc.context.to(dtype), encoder_hidden_states_image=clip, return_dict=False)[0]
        uncond = self.dm(h, tt, enc.context_null.to(dtype), encoder_hidden_states_image=clip, return_dict=False)[0]
        return cfg_combine(cond.float(), uncond.float(), enc.guide_scale)

    @torch.inference_mode()
    def denoise_iter(self, enc: EncodedRequest, *, noise: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The sampling steps one at a time, as :meth:`ModelRunner.denoise_iter` (same sampler, same noise).

        Args:
            enc: the encoded request (CFG on: ``context_null`` set).
            noise: float32 ``[1, 16, F', h, w]`` initial latents.

        Yields:
            ``(step index, steps, float32 latents after the step)``.
        """
        if not enc.enable_cfg or enc.context_null is None:
            raise ValueError("the Diffusers step runs with CFG on (context_null needed)")
        enc = enc.to(self.device)
        x = noise.to(self.device, torch.float32)
        sampler = make_sampler(enc.solver, enc.steps, enc.shift)  # ModelRunner's default schedule ("wan")
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(self.velocity(x, t.to(self.device), enc), x)
            yield i, len(sampler), x


def xfuser_status() -> dict:
    """The xfuser (xDiT) peer's record: not importable, or installed but not driven by this bench yet.

    xfuser's Wan USP runs inside its own runtime (``xFuserArgs``, ``init_distributed_environment``, its
    parallel groups and wrapped Diffusers processors); neither this CPU development machine nor the lent
    H200 has xfuser installed, so that path is not written here rather than written untested.
    """
    try:
        import xfuser  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "why": f"xfuser not importable: {e}"}
    return {"status": "not_run", "version": _version("xfuser"),
            "why": "xfuser is installed, but bench step does not drive xfuser's Wan USP runtime yet (not available "
                   "where this bench was written and tested)"}
