"""``ditfleet sparge-tune``: tune Sparge thresholds per DiT block and head, in SpargeAttn's checkpoint format.

Like SpargeAttn's autotune, each head gets the sparsest setting whose output stays within a
relative L1 error of dense attention (``sum |o - o_dense| / sum |o_dense|``, default 0.07,
SpargeAttn's): for every block, the self-attention q / k / v of the model on sample inputs are
captured (the model runs dense, stopped right after the block's attention), then every setting
of a grid — ``simthreshd1`` x ``cdfthreshd`` — is run for all heads at once; per head, the setting
of highest sparsity whose error stays within the bound on *every* sample wins. A head that
cannot reach ``--min-sparsity`` (default 0.1, SpargeAttn's) within the bound is written dense
(``is_sparse 0``, ``cdfthreshd 1``, ``simthreshd1 1``: SpargeAttn's own encoding).
``pvthreshd`` is written as SpargeAttn's untuned default (20): the built-in kernel does not skip
P.V products, and ``spas_sage_attn`` with 20 skips only blocks whose weights are below ``2^-20``.

The checkpoint is saved (atomically) after each block, so an interrupted run continues with
``--resume``, which skips the blocks the file already has.

Inputs: random latents (``N(0, 1)``) and random text features at the given video size and
timesteps (``--samples``, ``--timesteps``) — the mode that runs anywhere, the tiny model
included. Real prompts along real denoising trajectories give the patterns a deployment sees:
:func:`tune` takes any iterable of model inputs, so an engine can feed captured ``(x, t, context)``
from real runs; the CLI does not build the text encoder yet.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench.common import select_device
from .attention.base import AttentionBackend, Capabilities
from .attention.sparge import (
    BlockStats,
    SpargeParams,
    _dense_backend,
    block_sparse_math,
    block_stats,
    key_sum,
    predict_from_stats,
    sparse_attention,
)
from .attention.blockmask import BlockSparseMask
from .attention.sparge_ckpt import SUFFIXES, SpargeCheckpoint, dense_layer_params, load_sparge_checkpoint, save_sparge_checkpoint
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_L1 = 0.07  # SpargeAttn's autotune default (SparseAttentionMeansim(l1=0.07))
DEFAULT_SIM_GRID = (-0.25, 0.0, 0.25, 0.5, 0.75)
DEFAULT_CDF_GRID = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
DEFAULT_MIN_SPARSITY = 0.1  # SpargeAttn: a head tuned below 10 % sparsity runs dense
PRESETS = {
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32),
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ capture
class _Stop(Exception):
    def __init__(self, qkv):
        super().__init__("captured")
        self.qkv = qkv


class _CaptureBackend(AttentionBackend):
    """Dense self-attention that, at block ``target``, stops the forward with that block's q / k / v."""

    key = "sparge_capture"
    description = "dense attention capturing one block's q / k / v (sparge-tune)"
    caps = Capabilities(lse=True, devices=frozenset({"cpu", "cuda"}),
                        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}), max_head_dim=1024)
    target: int = -1
    layer: int = -1

    @functools.cached_property
    def dense(self) -> AttentionBackend:
        return _dense_backend(self.device, self.dtype)

    def _forward(self, q, k, v, *, scale, return_lse):
        if self.layer == self.target:
            raise _Stop((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return self.dense._forward(q, k, v, scale=scale, return_lse=return_lse)


def capture_block(model, layer: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention q, k, v ``[B, S, H, D]`` of DiT block ``layer`` for one model input (the model runs dense up to it)."""
    from .models.wan.dit import SELF_SITE

    saved = dict(model.backends)
    cap = _CaptureBackend(device=model.device, dtype=model.dtype)
    cap.target = layer

    def enter(i):
        def hook(module, args):
            cap.layer = i
        return hook

    handles = [blk.register_forward_pre_hook(enter(i)) for i, blk in enumerate(model.blocks)]
    try:
        model.set_attention({**saved, SELF_SITE: cap})
        with torch.no_grad():
            model(**inputs)
    except _Stop as stop:
        return stop.qkv
    finally:
        for h in handles:
            h.remove()
        model.set_attention(saved)
    raise RuntimeError(f"block {layer}'s self-attention was never called")


def random_inputs(model, *, latent: tuple[int, int, int], samples: int, timesteps: Sequence[float], seed: int) -> list[dict]:
    """``samples`` random model inputs: ``N(0, 1)`` latents ``[1, 16, F, H, W]`` and text features, timesteps cycled."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    out = []
    for i in range(samples):
        item = {"x": torch.randn(1, cfg.out_dim, f, h, w, generator=g),
                "t": torch.tensor([float(timesteps[i % len(timesteps)])]),
                "context": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)}
        if cfg.has_image_branch:
            item["clip_fea"] = torch.randn(1, 257 * (2 if cfg.model_type == "flf2v" else 1), cfg.image_dim, generator=g)
            item["y"] = torch.randn(1, cfg.in_dim - cfg.out_dim, f, h, w, generator=g)
        out.append(item)
    return out


# ------------------------------------------------------------------------------ search
@dataclass
class LayerResult:
    """What the search found for one block."""

    layer: int
    params: SpargeParams
    sparsity: list[float]  # per head, mean over samples, of the chosen setting
    l1: list[float]  # per head, max over samples
    seconds: float
    grid: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        p = self.params
        return {"layer": self.layer, "is_sparse": p.is_sparse.tolist(), "cdfthreshd": p.cdfthreshd.tolist(),
                "simthreshd1": p.simthreshd1.tolist(), "sparsity": self.sparsity, "rel_l1": self.l1,
                "seconds": round(self.seconds, 3)}


def _sparse_out(q, k, v, blocks, block, scale):
    if q.device.type == "cuda":
        mask = BlockSparseMask.from_blocks(blocks, block, q.shape[1], k.shape[1], device=q.device)
        return sparse_attention(q, k, v, mask, scale=scale, return_lse=False)[0].float()
    return block_sparse_math(q, k, v, blocks, block, scale=scale)


def _dense_out(q, k, v, scale):
    if q.device.type == "cuda":
        return _dense_backend(q.device, q.dtype)(q, k, v, scale=scale)[0].float()
    full = torch.ones(q.shape[0], q.shape[2], -(-q.shape[1] // 128), -(-k.shape[1] // 64), dtype=torch.bool)
    return block_sparse_math(q, k, v, full, (128, 64), scale=scale)


def search_layer(samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, l1: float = DEFAULT_L1,
                 sim_grid: Sequence[float] = DEFAULT_SIM_GRID, cdf_grid: Sequence[float] = DEFAULT_CDF_GRID,
                 min_sparsity: float = DEFAULT_MIN_SPARSITY, scale: float | None = None,
                 base: SpargeParams | None = None) -> tuple[SpargeParams, list[float], list[float], dict]:
    """Per-head search over ``sim_grid x cdf_grid`` on captured ``(q, k, v)`` samples of one block.

    Returns:
        ``(params, sparsity per head, rel L1 per head, grid)`` where ``grid`` has the full tables
        (``rel_l1`` max over samples and ``sparsity`` mean, each ``[n_sim][n_cdf][H]``).
    """
    h = samples[0][0].shape[2]
    scale = samples[0][0].shape[-1] ** -0.5 if scale is None else scale
    proto = base or SpargeParams.thresholds(h, cdfthreshd=1.0, simthreshd1=0.0)
    ns, nc = len(sim_grid), len(cdf_grid)
    err = torch.zeros(ns, nc, h, dtype=torch.float64)
    spars = torch.zeros(ns, nc, h, dtype=torch.float64)
    for q, k, v in samples:
        ref = _dense_out(q, k, v, scale)
        ref_abs = ref.abs().sum((0, 1, 3)).double().clamp(min=1e-30)  # [H]
        mean = key_sum(k) / k.shape[1] if proto.smooth_k else None
        qs: BlockStats = block_stats(q, proto.block_q)
        ks: BlockStats = block_stats(k, proto.block_k, mean=mean)
        area = q.shape[1] * k.shape[1]
        rows = qs.count  # real rows per query block
        for i, sim in enumerate(sim_grid):
            for j, cdf in enumerate(cdf_grid):
                params = SpargeParams.thresholds(h, cdfthreshd=cdf, simthreshd1=sim, block_q=proto.block_q,
                                                 block_k=proto.block_k, sink=proto.sink, smooth_k=proto.smooth_k)
                blocks = predict_from_stats(qs, ks, params, scale=scale)  # [B, H, NQ, NK]
                out = _sparse_out(q, k, v, blocks, (proto.block_q, proto.block_k), scale)
                e = (out - ref).abs().sum((0, 1, 3)).double() / ref_abs
                allowed = (blocks.double() * rows.double()[:, None] * ks.count.double()[None, :]).sum((-2, -1)).mean(0)
                err[i, j] = torch.maximum(err[i, j], e.cpu())
                spars[i, j] += (1 - allowed / area).cpu() / len(samples)
    feasible = err <= l1
    score = torch.where(feasible, spars, torch.full_like(spars, -1.0)).flatten(0, 1)  # [ns * nc, H]
    best = score.argmax(0)  # per head; ties: the first (lower sim, lower cdf) -- both grids ascending
    cdf_t = torch.tensor(list(cdf_grid), dtype=torch.float32)
    sim_t = torch.tensor(list(sim_grid), dtype=torch.float32)
    sel_cdf, sel_sim = cdf_t[best % nc], sim_t[best // nc]
    sel_sp = score.gather(0, best[None])[0]
    sel_err = err.flatten(0, 1).gather(0, best[None])[0]
    sparse = sel_sp >= min_sparsity
    dense = dense_layer_params(h)
    params = SpargeParams.thresholds(
        h, cdfthreshd=torch.where(sparse, sel_cdf, dense.cdfthreshd), simthreshd1=torch.where(sparse, sel_sim, dense.simthreshd1),
        is_sparse=sparse, block_q=proto.block_q, block_k=proto.block_k, sink=proto.sink, smooth_k=proto.smooth_k)
    sparsity = torch.where(sparse, sel_sp, torch.zeros_like(sel_sp)).tolist()
    errors = torch.where(sparse, sel_err, torch.zeros_like(sel_err)).tolist()
    grid = {"sim_grid": list(sim_grid), "cdf_grid": list(cdf_grid), "rel_l1": err.tolist(), "sparsity": spars.tolist()}
    return params, sparsity, errors, grid


def tune(model, inputs: Iterable[dict] | Callable[[], Iterable[dict]], out: str | Path, *, l1: float = DEFAULT_L1,
         sim_grid: Sequence[float] = DEFAULT_SIM_GRID, cdf_grid: Sequence[float] = DEFAULT_CDF_GRID,
         min_sparsity: float = DEFAULT_MIN_SPARSITY, resume: bool = False,
         progress: Callable[[LayerResult], None] | None = None) -> tuple[SpargeCheckpoint, list[LayerResult]]:
    """Tune every block of ``model`` not yet in ``out``; save ``out`` after each block.

    Args:
        model: a :class:`~ditfleet.models.wan.WanDiT` (single process) with its attention set.
        inputs: model inputs (``dict(x=, t=, context=[, clip_fea=, y=])``); a list is reused for every
            block, a callable is called once per block.
        out: checkpoint path (``.pt`` / ``.pth`` / ``.safetensors``).
        resume: continue from the blocks ``out`` already has (else ``out`` must not exist).

    Returns:
        ``(checkpoint, results of the blocks tuned now)``.
    """
    cfg = model.config
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise UserError(f"--out {str(out)!r}: a Sparge checkpoint must end in {' / '.join(SUFFIXES)}")
    if out.exists():
        if not resume:
            raise UserError(f"--out {str(out)!r} exists; pass --resume to continue it or remove it first")
        ckpt = load_sparge_checkpoint(out, num_layers=cfg.num_layers, num_heads=cfg.num_heads, warn_missing=False,
                                      allow_empty=True)
        log.info("sparge-tune: resuming %s: %d of %d blocks done", out, len(ckpt.layers), cfg.num_layers)
    else:
        ckpt = SpargeCheckpoint(cfg.num_layers, cfg.num_heads, {}, str(out))
    results = []
    for layer in ckpt.missing:
        t0 = time.perf_counter()
        batch = inputs() if callable(inputs) else inputs
        samples = [capture_block(model, layer, item) for item in batch]
        if not samples:
            raise UserError("sparge-tune: no sample inputs")
        params, sp, err, grid = search_layer(samples, l1=l1, sim_grid=sim_grid, cdf_grid=cdf_grid, min_sparsity=min_sparsity)
        del samples
        ckpt = ckpt.with_layer(layer, params)
        save_sparge_checkpoint(ckpt, out)
        res = LayerResult(layer, params, sp, err, time.perf_counter() - t0, grid)
        results.append(res)
        if progress is not None:
            progress(res)
    return ckpt, results


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``ditfleet sparge-tune``'s options."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="Wan2.1 DiT folder (official or Diffusers layout) to tune")
    src.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="a randomly initialised DiT instead (tiny: seconds on a CPU; for trying the tool)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pt / .pth / .safetensors), saved after each block")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run: skip the blocks --out already has")
    parser.add_argument("--video", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), default=None,
                        help="video size in pixels the samples have (default: 81 480 832; tiny preset: 5 128 256)")
    parser.add_argument("--samples", type=int, default=2, help="random inputs per block (default: %(default)s)")
    parser.add_argument("--timesteps", type=float, nargs="+", default=[900.0, 500.0, 100.0],
                        help="timesteps of the samples, cycled (default: %(default)s)")
    parser.add_argument("--l1", type=float, default=DEFAULT_L1,
                        help="bound on the relative L1 error vs dense per head (default: %(default)s, SpargeAttn's)")
    parser.add_argument("--min-sparsity", type=float, default=DEFAULT_MIN_SPARSITY,
                        help="heads below this sparsity run dense (default: %(default)s)")
    parser.add_argument("--sim-grid", type=float, nargs="+", default=list(DEFAULT_SIM_GRID),
                        help="simthreshd1 values tried (default: %(default)s)")
    parser.add_argument("--cdf-grid", type=float, nargs="+", default=list(DEFAULT_CDF_GRID),
                        help="cdfthreshd values tried (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and the preset's weights")
    parser.add_argument("--report", default=None, help="also write a JSON report of every block's search here")


def _check_args(args) -> None:
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if not 0 < args.l1 < 10:
        raise UserError(f"--l1 must be > 0, got {args.l1}")
    if not 0 <= args.min_sparsity < 1:
        raise UserError(f"--min-sparsity must lie in [0, 1), got {args.min_sparsity}")
    if any(not -1 <= s <= 1 for s in args.sim_grid):
        raise UserError(f"--sim-grid values must lie in [-1, 1], got {args.sim_grid}")
    if any(not 0 <= c <= 1 for c in args.cdf_grid):
        raise UserError(f"--cdf-grid values must lie in [0, 1], got {args.cdf_grid}")
    if args.model is None and args.preset is None:
        raise UserError("sparge-tune: give --model PATH (the DiT to tune) or --preset (a random DiT, for trying the tool)")
    if Path(args.out).suffix not in SUFFIXES:
        raise UserError(f"--out {args.out!r}: a Sparge checkpoint must end in {' / '.join(SUFFIXES)}")


def _latent(video: Sequence[int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    frames, height, width = video
    if frames < 1 or (frames - 1) % 4 or height % 16 or width % 16 or min(height, width) < 16:
        raise UserError(f"--video {frames} {height} {width}: frames must be 4n+1, height and width multiples of 16")
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    if lat[0] % patch[0] or lat[1] % patch[1] or lat[2] % patch[2]:
        raise UserError(f"--video {frames} {height} {width}: latent {lat} is not a multiple of the patch {patch}")
    return lat


def build_model(args, device: torch.device, dtype: torch.dtype):
    from .models.wan import WanDiTConfig, build_dit, load_dit

    if args.model is not None:
        return load_dit(args.model, device=device, dtype=dtype)
    return build_dit(WanDiTConfig(**PRESETS[args.preset]), device=device, dtype=dtype, seed=args.seed)


def main(args: argparse.Namespace) -> int:
    """Run the tuning; returns 0."""
    _check_args(args)
    device = select_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(args, device, dtype)
    cfg = model.config
    video = args.video or ((5, 128, 256) if args.preset == "tiny" else (81, 480, 832))
    latent = _latent(video, cfg.patch_size)
    tokens = latent[0] // cfg.patch_size[0] * (latent[1] // cfg.patch_size[1]) * (latent[2] // cfg.patch_size[2])
    if args.model is not None:
        log.warning("sparge-tune: tuning on random latents and text features; real prompts and trajectories give "
                    "the attention a deployment sees (feed them through ditfleet.sparge_tune.tune)")
    inputs = random_inputs(model, latent=latent, samples=args.samples, timesteps=args.timesteps, seed=args.seed)
    print(f"[sparge-tune] {cfg.num_layers} blocks x {cfg.num_heads} heads, {tokens} tokens per sample, "
          f"{args.samples} sample(s), rel L1 <= {args.l1}, grid {len(args.sim_grid)} x {len(args.cdf_grid)}, "
          f"{device}/{str(dtype).removeprefix('torch.')} -> {args.out}", flush=True)
    report: list[dict] = []

    def progress(res: LayerResult) -> None:
        sp = sum(res.sparsity) / len(res.sparsity)
        n = int(res.params.is_sparse.sum())
        print(f"[sparge-tune] block {res.layer}: {n}/{len(res.sparsity)} heads sparse, mean sparsity {sp:.3f}, "
              f"max rel L1 {max(res.l1):.4f} ({res.seconds:.1f} s); saved", flush=True)
        report.append({**res.as_dict(), "grid": res.grid})

    ckpt, results = tune(model, inputs, args.out, l1=args.l1, sim_grid=args.sim_grid, cdf_grid=args.cdf_grid,
                         min_sparsity=args.min_sparsity, resume=args.resume, progress=progress)
    if args.report:
        from .bench.common import write_json

        write_json(args.report, {"out": str(args.out), "l1": args.l1, "min_sparsity": args.min_sparsity,
                                 "video": list(video), "tokens": tokens, "samples": args.samples,
                                 "timesteps": args.timesteps, "inputs": "random latents and text features",
                                 "blocks": report})
    print(f"[sparge-tune] done: {len(ckpt.layers)}/{cfg.num_layers} blocks in {args.out}"
          + (f" ({len(results)} tuned now)" if args.resume else ""), flush=True)
    return 0


__all__ = ["LayerResult", "add_arguments", "capture_block", "main", "random_inputs", "search_layer", "tune"]
