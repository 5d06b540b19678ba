"""``ditfleet bench step``: whole denoising steps of a real-shape Wan DiT, on 1 GPU and across N.

One step is what the engine runs per timestep: classifier-free guidance on (both passes), the
guided velocity, the sampler step, through the engine's own :class:`~ditfleet.engine.runner.ModelRunner`
on a random-weight DiT built directly on the device (:func:`ditfleet.models.wan.build_dit`)::

    ditfleet bench step --model t2v-1.3b --video 480p81                       # one GPU (or in-process)
    torchrun --nproc-per-node 4 -m ditfleet bench step --model t2v-14b --video 720p81
    ditfleet bench step --launcher ray --world-size 4 ...                     # Ray actors, same code
    ditfleet bench step --tiny                                                # CPU smoke run (gloo)

At world size N it runs every layout the mesh allows (:func:`layouts_for`: Ulysses N, ring N, USP
``u x r`` for each divisor, and cfg 2 x each of those of N / 2 when N is even) for each
``--attn-types`` entry (a config attention type at ``self_attn_1_type``, resolved by
:func:`ditfleet.attention.registry.resolve` as a run resolves it, with ``need_lse`` under a ring;
cross-attention on the dense ``--cross-kernel``), and first, in the same run, the one-GPU baseline
of that type (rank 0 alone, the others wait in the error agreement).

Per entry: ``s_per_step`` (each rank's median over the timed steps after ``--warmup``, CUDA events on
a GPU, ``perf_counter`` on the CPU; the slowest rank's), speedup and efficiency against the
baseline of the same type, peak memory per rank, the kernel per site, the SP transport, and the
rel L2 of the final latents against the baseline's (same noise, same steps). An error on any rank
is agreed on by all (one all-reduce) and recorded in the entry; the run goes on. Peers in the same
run (:mod:`ditfleet.bench.peers`): Diffusers (its own one-GPU step and its context parallelism
over the SP layouts), xfuser. Rank 0 writes the JSON after every entry (``complete`` false until
the end), then a PNG of steps/s against GPUs with the ideal line where matplotlib imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..attention import registry
from ..config import RadialAttnSetting
from ..errors import BackendUnavailableError, UserError
from .attention import card_slug
from .common import environment, rel_l2, short_commit, write_json
from .dit import DTYPES, EXACT_TYPES, MODELS, TINY_SHAPE, bind_self_attention, latent_shape, model_config
from .dit import cross_kernel as dit_cross_kernel

VIDEOS = {"480p81": (81, 480, 832), "720p81": (81, 720, 1280), "720p241": (241, 720, 1280)}
DEFAULT_VIDEO = {"t2v-1.3b": "480p81", "t2v-14b": "720p81", "i2v-14b": "720p81"}
GIB = float(1 << 30)
SELF_SITE = "self_attn_1_type"
SHIFT, GUIDE_SCALE = 5.0, 5.0  # the config's sample_shift / sample_guide_scale defaults
TRANSPORT_NOTE = ("parallel.seq_p_attn_type of the layout and the transport its mesh resolved (ParallelMesh.transport: "
                  "nccl = torch.distributed, NCCL on GPUs / gloo on CPU; copy_engine = symmetric memory + copy-engine "
                  "pulls); layouts named '+ce' run on copy_engine (--transports)")
TRANSPORT_SUFFIX = {"nccl": "", "copy_engine": "+ce"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options (the ``ditfleet bench step`` subparser)."""
    parser.add_argument("--model", choices=MODELS, default="t2v-14b", help="model shapes (default: %(default)s)")
    parser.add_argument("--video", choices=sorted(VIDEOS), default=None,
                        help="video size: 480p81 (832x480, 81 frames), 720p81, 720p241 (default: 480p81 for 1.3B, "
                             "720p81 for 14B; --tiny: 9 frames 96x64)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (overrides --video)")
    parser.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (overrides --video)")
    parser.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (overrides --video)")
    parser.add_argument("--layers", type=int, default=None, help="blocks in the DiT (default: the model's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default: %(default)s)")
    parser.add_argument("--attn-types", nargs="+", default=None, metavar="TYPE",
                        help=f"self-attention types to run ({', '.join(registry.ATTN_TYPES)}, or 'all'); default: "
                             "torch_sdpa, plus flash_attn4 where it runs")
    parser.add_argument("--cross-kernel", default=None, metavar="KEY",
                        help="dense kernel of the cross-attention sites (default: fa4 where it runs, else the "
                             "torch_sdpa kernel)")
    parser.add_argument("--transports", nargs="+", default=None, choices=sorted(TRANSPORT_SUFFIX),
                        help="parallel.transport of the SP layouts, each timed as its own layout (copy_engine ones "
                             "named '+ce'; a mesh that refuses it records why); default: nccl and copy_engine on "
                             "CUDA, nccl on the CPU")
    parser.add_argument("--layouts", nargs="+", default=None, metavar="NAME",
                        help="run only these layouts of the world size (names as in the JSON: ulysses4, ring4, usp2x2, "
                             "cfg2, cfg2+ulysses2, ...); the 1-GPU baseline always runs")
    parser.add_argument("--sparge-topk", type=float, default=0.5, help="sparge: top-k fraction (default: %(default)s)")
    parser.add_argument("--radial-decay", type=float, default=RadialAttnSetting().decay_factor,
                        help="radial_attn: decay_factor (default: %(default)s)")
    parser.add_argument("--radial-block-size", type=int, default=RadialAttnSetting().block_size,
                        help="radial_attn: block_size (default: %(default)s)")
    parser.add_argument("--solver", choices=("unipc", "euler"), default="unipc", help="sampler (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per entry (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per entry (default: %(default)s)")
    parser.add_argument("--peers", nargs="*", default=["diffusers", "xfuser"], choices=["diffusers", "xfuser"],
                        help="peers to run where installed (default: both; none: --peers)")
    parser.add_argument("--diffusers-kernel", choices=("cudnn", "flash", "efficient", "default"), default="cudnn",
                        help="torch SDPA backend of Diffusers' attention on a GPU (default: %(default)s)")
    parser.add_argument("--launcher", choices=("torchrun", "ray"), default="torchrun",
                        help="torchrun: this process is a rank of the world torchrun started (none: a world of one); "
                             "ray: --world-size actors in a placement group run the same code (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=None, help="--launcher ray: number of ranks")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="collective timeout (ranks wait this long for the 1-GPU baseline; default: %(default)s)")
    parser.add_argument("--eager", action="store_true", help="run the fused elementwise ops eagerly (no torch.compile)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and video (CPU smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and noise (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/step_<card>_<N>gpu_<commit>_<model>_<video>.json)")


# ---- layouts ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to spread a step over ``cfg * ring * ulysses`` processes (1, 1, 1: the one-GPU baseline)."""

    name: str
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    transport: str = "nccl"

    @property
    def gpus(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def seq_p_attn_type(self) -> str | None:
        """The config's ``parallel.seq_p_attn_type`` of this layout (``None``: no sequence parallelism)."""
        if self.ring > 1:
            return "usp" if self.ulysses > 1 else "ring"
        return "ulysses" if self.ulysses > 1 else None


SINGLE = Layout("1gpu")


def _sp_layouts(n: int) -> list[Layout]:
    if n == 1:
        return []
    out = [Layout(f"ulysses{n}", ulysses=n), Layout(f"ring{n}", ring=n)]
    return out + [Layout(f"usp{u}x{n // u}", ring=n // u, ulysses=u) for u in range(2, n) if n % u == 0]


def layouts_for(world: int, transports=("nccl",)) -> list[Layout]:
    """Every layout of ``world`` processes: Ulysses N, ring N, USP ``u x r`` (u = Ulysses degree) for each
    divisor, and, when N is even, cfg 2 with each of those of N / 2 (cfg 2 alone at N = 2); the layouts with
    sequence parallelism once per transport of ``transports`` (``+ce``: copy_engine)."""
    out = _sp_layouts(world)
    if world % 2 == 0:
        half = _sp_layouts(world // 2)
        out += [Layout(f"cfg2+{lay.name}", 2, lay.ring, lay.ulysses) for lay in half] if half else [Layout("cfg2", 2)]
    return [dataclasses.replace(lay, name=lay.name + TRANSPORT_SUFFIX[t], transport=t)
            for lay in out for t in transports if t == "nccl" or lay.ring * lay.ulysses > 1]


def transports_of(args, cuda: bool) -> tuple[str, ...]:
    """``--transports``, or its default: both on CUDA (the whole-step comparison ``auto`` waits for), nccl on CPU."""
    return tuple(args.transports or (("nccl", "copy_engine") if cuda else ("nccl",)))


class Meshes:
    """One :class:`~ditfleet.parallel.ParallelMesh` per ``(cfg, ring, ulysses)``, built on first use (a
    collective: every rank asks for the same meshes in the same order)."""

    def __init__(self):
        self._meshes: dict = {}

    def get(self, lay: Layout):
        from ..parallel import init_parallel

        key = (lay.cfg, lay.ring, lay.ulysses, lay.transport)
        if key not in self._meshes:
            self._meshes[key] = init_parallel(ulysses_size=lay.ulysses, ring_size=lay.ring, cfg_size=lay.cfg,
                                              transport=lay.transport)
        return self._meshes[key]


def transport(lay: Layout, mesh) -> dict:
    """The SP transport of ``lay`` on ``mesh`` (see :data:`TRANSPORT_NOTE`)."""
    out: dict = {"seq_p_attn_type": lay.seq_p_attn_type,
                 "backend": str(dist.get_backend()) if dist.is_initialized() else None}
    if lay.ring * lay.ulysses > 1:
        out.update(sp=mesh.transport, reason=mesh.transport_reason)
    if lay.cfg > 1:
        out["cfg"] = "all_gather of the two branches"
    return out


# ---- agreement, timing ------------------------------------------------------------------------------------
def _err(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:400]


def agreed(fn: Callable[[], object], world: int, device: torch.device, rank: int,
           trace: bool = True) -> tuple[object, str | None]:
    """``(fn(), None)`` when ``fn`` succeeded on every rank, else ``(None, "rank r: error; ...")`` on every rank.

    One all-reduce (and, after a failure, one all-gather of the messages): every rank must call it.
    ``trace``: rank 0 prints the traceback of its own failure.
    """
    value, err = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the entry, the run goes on
        err = _err(e)
        if rank == 0 and trace:
            traceback.print_exc()
    if world == 1:
        return (None, f"rank 0: {err}") if err else (value, None)
    flag = torch.tensor([1 if err else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return value, None
    errors = [None] * world
    dist.all_gather_object(errors, err)
    return None, "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(make_iter: Callable, steps: int, warmup: int, device: torch.device) -> dict:
    """Run ``steps`` sampling steps of ``make_iter()`` (a ``denoise_iter``) and time each.

    Returns:
        ``{"times_s": [timed steps after warmup], "median_s", "latents": float32 final latents (CPU),
        "peak_mem_gib": this rank's peak (GPU; None on CPU)}``.
    """
    _reset_peak(device)
    it = make_iter()
    cuda = device.type == "cuda"
    marks, x = [], None
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _, _, x = next(it)
            end.record()
            marks.append((start, end))
        else:
            t0 = time.perf_counter()
            _, _, x = next(it)
            marks.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        marks = [s.elapsed_time(e) / 1e3 for s, e in marks]
    it.close()
    times = marks[warmup:]
    return {"times_s": times, "median_s": statistics.median(times), "latents": x.float().cpu(),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None}


def _gather_floats(value: float | None, world: int, device: torch.device) -> list:
    if world == 1:
        return [value]
    t = torch.tensor([math.nan if value is None else value], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [None if math.isnan(float(v.item())) else float(v.item()) for v in out]


def finish_entry(rec: dict, local: dict | None, err: str | None, *, solo: bool, base: dict | None, world: int,
                 device: torch.device, rank: int) -> torch.Tensor | None:
    """Fill ``rec`` from this rank's measurement ``local`` (collectives unless ``solo``); returns rank 0's latents.

    ``base``: the baseline entry's record with its ``_latents`` (rank 0), for speedup and rel L2.
    """
    if err:
        rec.update(status="error", error=err)
        return None
    if solo:  # rank 0 alone measured; the other ranks have nothing to add
        per_rank, peaks = [local["median_s"]] if rank == 0 else [], [local["peak_mem_gib"]] if rank == 0 else []
    else:
        per_rank = _gather_floats(local["median_s"], world, device)
        peaks = _gather_floats(local["peak_mem_gib"], world, device)
        x = local["latents"].to(device)
        ref = x.clone()
        if world > 1:
            dist.broadcast(ref, src=0)
        diff = torch.tensor([float((x - ref).abs().max())], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        rec["rank_max_abs_diff"] = float(diff.item())  # every rank ends with the same latents
    rec["status"] = "ok"
    if rank != 0:
        return None
    s = max(per_rank)
    rec.update(s_per_step=s, steps_per_s=1.0 / s, s_per_step_per_rank=per_rank,
               times_s_rank0=local["times_s"], peak_mem_gib_per_rank=peaks)
    if base is None:  # the baseline itself
        rec.update(speedup=1.0, efficiency=1.0 / rec["gpus"])
    elif base.get("status") == "ok":
        rec["speedup"] = base["s_per_step"] / s
        rec["efficiency"] = rec["speedup"] / rec["gpus"]
        rec["rel_l2_vs_1gpu"] = rel_l2(local["latents"], base["_latents"])
    else:
        rec["speedup"] = rec["efficiency"] = rec["rel_l2_vs_1gpu"] = None
        rec["speedup_why"] = "the 1-GPU baseline of this type failed"
    return local["latents"]


# ---- set-up -------------------------------------------------------------------------------------------------
def video_of(args) -> tuple[str, tuple[int, int, int]]:
    """``(label, (frames, height, width))`` of the command line."""
    if args.tiny and args.video is None:
        base, label = TINY_SHAPE, "tiny"
    else:
        label = args.video or DEFAULT_VIDEO[args.model]
        base = VIDEOS[label]
    size = tuple(v if v is not None else d for v, d in zip((args.frames, args.height, args.width), base))
    if size != base:
        label = f"{size[0]}f{size[2]}x{size[1]}"
    return label, size


def check_args(args) -> None:
    """User errors of the command line, before any process group (identical on every rank)."""
    if args.iters < 1 or args.warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} / {args.warmup}")
    if not 0 < args.sparge_topk <= 1:
        raise UserError(f"--sparge-topk must lie in (0, 1], got {args.sparge_topk}")
    if args.radial_block_size < 16 or args.radial_block_size % 16:
        raise UserError(f"--radial-block-size must be a positive multiple of 16, got {args.radial_block_size}")
    latent_shape(*video_of(args)[1])
    model_config(args)
    bad = [t for t in args.attn_types or [] if t != "all" and t not in registry.ATTN_TYPES]
    if bad:
        raise UserError(f"--attn-types: unknown attention type {', '.join(bad)}; valid: "
                        f"{', '.join(registry.valid_types(SELF_SITE))} (or all)")
    if args.cross_kernel is not None and args.cross_kernel not in registry.KERNELS:
        raise UserError(f"--cross-kernel: unknown kernel {args.cross_kernel}; known: {', '.join(registry.KERNELS)}")
    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    if not cuda and not args.tiny:
        raise UserError("bench step at real model sizes needs CUDA GPUs; pass --tiny for a CPU smoke run")
    if args.launcher == "ray" and (args.world_size is None or args.world_size < 1):
        raise UserError("--launcher ray needs --world-size N (N >= 1)")
    if args.launcher != "ray" and args.world_size is not None:
        raise UserError("--world-size is for --launcher ray; under torchrun the world is torchrun's --nproc-per-node")
    world = args.world_size if args.launcher == "ray" else int(os.environ.get("WORLD_SIZE", "1"))
    names = [lay.name for lay in layouts_for(world, transports_of(args, cuda))]
    unknown = [n for n in args.layouts or [] if n not in names]
    if unknown:
        raise UserError(f"--layouts: {', '.join(unknown)} not a layout of {world} process(es); "
                        f"valid: {', '.join(names) or 'none (a world of one runs the 1-GPU baseline only)'}")


def attn_types(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    if args.attn_types and "all" in args.attn_types:
        return list(registry.ATTN_TYPES)
    if args.attn_types:
        return list(dict.fromkeys(args.attn_types))
    out = ["torch_sdpa"]
    try:
        if not registry.resolve("flash_attn4", site=SELF_SITE, device=device, dtype=dtype).fallback:
            out.append("flash_attn4")
    except BackendUnavailableError:
        pass
    return out


def cross_kernel(args, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str, object]:
    """``(key, why, backend)`` of the cross-attention sites: bench dit's choice and checks, constructed here."""
    key, why, cls = dit_cross_kernel(args, device, dtype, head_dim)
    return key, why, cls(device=device, dtype=dtype)


def same_weights(model, world: int, device: torch.device) -> str:
    """Make every rank hold rank 0's weights: a float64 checksum compared, the parameters broadcast if it differs."""
    if world == 1:
        return "one process"
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for p in model.parameters():
        total += p.sum(dtype=torch.float64)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if float(lo.item()) == float(hi.item()):
        return "identical on every rank (float64 checksum)"
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    return "broadcast from rank 0 (the ranks' checksums differed)"


def make_request(cfg, lat: tuple[int, int, int], steps: int, solver: str, seed: int):
    """Random text (and I2V image) features as an :class:`EncodedRequest`, identical on every rank (CPU generator)."""
    from ..engine.request import EncodedRequest

    g = torch.Generator().manual_seed(seed + 1)
    f, h, w = lat
    context, context_null = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in range(2))
    clip = torch.randn(1, 257, cfg.image_dim, generator=g) if cfg.has_image_branch else None
    y = torch.randn(1, cfg.in_dim - 16, f, h, w, generator=g) if cfg.has_image_branch else None
    return EncodedRequest(context=context, context_null=context_null, clip_fea=clip, y=y, latent_shape=(16, f, h, w),
                          seed=seed, steps=steps, shift=SHIFT, guide_scale=GUIDE_SCALE, enable_cfg=True, solver=solver)


# ---- the run -------------------------------------------------------------------------------------------------
def _header(kind: str, label: str, lay: Layout, extra: dict | None) -> dict:
    return {"kind": kind, "label": label, "layout": lay.name, "gpus": lay.gpus, "cfg": lay.cfg, "ring": lay.ring,
            "ulysses": lay.ulysses, **(extra or {})}


class Bench:
    """The state of one run on one rank: model, request, meshes, the records (rank 0 writes them)."""

    def __init__(self, args, env, launcher: dict):
        from ..engine.runner import initial_noise
        from ..models.wan import build_dit
        from ..models.wan.ops import fused_mode, set_compile

        set_compile(not args.eager)
        self.args, self.rank, self.world, self.device = args, env.rank, env.world_size, env.device
        self.dtype = DTYPES[args.dtype]
        self.cfg = cfg = model_config(args)
        self.video, (frames, height, width) = video_of(args)
        self.lat = latent_shape(frames, height, width)
        tokens = math.prod(n // p for n, p in zip(self.lat, cfg.patch_size))
        self.steps = args.warmup + args.iters
        self.cross_key, cross_why, self.cross = cross_kernel(args, self.device, self.dtype, cfg.head_dim)
        self.radial = RadialAttnSetting(decay_factor=args.radial_decay, block_size=args.radial_block_size,
                                        dense_timesteps=0, dense_layers=0)
        self.model = build_dit(cfg, device=self.device, dtype=self.dtype, seed=args.seed, std=0.02)
        weights = same_weights(self.model, self.world, self.device)
        self.enc = make_request(cfg, self.lat, self.steps, args.solver, args.seed)
        self.noise = initial_noise(self.enc.latent_shape, args.seed)
        self.meshes = Meshes()
        self.layouts = [lay for lay in layouts_for(self.world, transports_of(args, self.device.type == "cuda"))
                        if not args.layouts or lay.name in args.layouts]
        env_rec = environment(self.world)
        env_rec["device"] = str(self.device)
        if self.device.type == "cuda":
            env_rec["card"] = torch.cuda.get_device_name(self.device)
        self.out = Path(args.out or f"benchmarks/results/step_{card_slug(env_rec['card'])}_{self.world}gpu_"
                        f"{short_commit(env_rec['commit'])}_{args.model}_{self.video}.json")
        if not self.out.is_absolute() and getattr(args, "cwd", None):
            self.out = Path(args.cwd) / self.out
        self.report = {
            "suite": "step", "environment": env_rec, "launcher": launcher,
            "config": {
                "model": args.model, "tiny": args.tiny, "model_config": dataclasses.asdict(cfg), "video": self.video,
                "frames": frames, "height": height, "width": width, "latent": [1, 16, *self.lat], "tokens": tokens,
                "dtype": args.dtype, "weights": f"random N(0, 0.02) built on the device; {weights}",
                "cfg": "on: conditional + unconditional pass per step (ModelRunner.predict), guide scale "
                       f"{GUIDE_SCALE}, then the sampler step", "solver": args.solver, "shift": SHIFT,
                "steps_per_entry": self.steps, "warmup": args.warmup, "iters": args.iters, "seed": args.seed,
                "cross_kernel": self.cross_key, "cross_kernel_why": cross_why,
                "radial_attn_setting": dataclasses.asdict(self.radial), "sparge_topk": args.sparge_topk,
                "fused_ops": fused_mode() if self.device.type == "cuda" else "eager",
                "layouts": [dataclasses.asdict(lay) for lay in [SINGLE, *self.layouts]],
                "timing": "per rank the median over the timed steps (CUDA events around each step on a GPU, "
                          "perf_counter on the CPU); s_per_step is the slowest rank's (all-reduce MAX)",
                "baseline": "1gpu: rank 0 alone (no mesh), the other ranks wait; speedup = its s_per_step / the "
                            "entry's, efficiency = speedup / GPUs of the entry",
                "peak_mem": "torch.cuda.max_memory_allocated per rank over the entry's steps (weights included); "
                            "null on the CPU",
                "transport": TRANSPORT_NOTE,
                "rel_l2": "final latents after steps_per_entry steps from the same noise vs the 1gpu entry of the type",
            },
            "unavailable": {}, "entries": [], "peers": {}, "summary": {}, "complete": False,
        }

    def save(self) -> None:
        if self.rank == 0:
            strip = [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.report["entries"]]
            write_json(self.out, {**self.report, "entries": strip})

    def _entry(self, kind: str, label: str, lay: Layout, make_iter: Callable, *, solo: bool, base: dict | None,
               extra: dict | None = None, prepare: Callable | None = None) -> dict:
        rec = _header(kind, label, lay, extra)
        mine = not solo or self.rank == 0
        # set-up, then the steps, each agreed on: a set-up that failed on one rank never leaves the others
        # inside a step's collectives (a failure inside a step's collectives is bounded by --timeout-s only)
        info, err = agreed(lambda: prepare() if prepare is not None and mine else {}, self.world, self.device,
                           self.rank, trace=kind == "ditfleet")
        local = None
        if not err:
            rec.update(info)
            local, err = agreed(lambda: time_steps(make_iter, self.steps, self.args.warmup, self.device) if mine
                                else None, self.world, self.device, self.rank, trace=kind == "ditfleet")
        rec["_latents"] = finish_entry(rec, local, err, solo=solo, base=base, world=self.world, device=self.device,
                                       rank=self.rank)
        self.report["entries"].append(rec)
        self.save()
        if self.rank == 0:
            print("[bench step] " + row(rec), flush=True)
        return rec

    def _attention(self, res) -> dict:
        """Self-attention on the resolved kernel, every cross-attention site on the dense cross kernel."""
        return {site: res.backend if site == SELF_SITE else self.cross for site in self.model.required_sites()}

    def run_type(self, t: str) -> None:
        """The baseline and every layout of attention type ``t``."""
        from ..engine.runner import ModelRunner

        model, args = self.model, self.args
        resolved: dict[bool, object] = {}

        def resolution(need_lse: bool):
            if need_lse not in resolved:
                resolved[need_lse] = registry.resolve(t, site=SELF_SITE, device=self.device, dtype=self.dtype,
                                                      need_lse=need_lse)
            return resolved[need_lse]

        made: dict = {}  # the runner of the current entry

        def setup(lay: Layout):
            def prepare():
                mesh = self.meshes.get(lay) if lay.gpus > 1 else None  # a collective, on every rank
                res = resolution(lay.ring > 1)
                model.set_parallel(None)
                model.set_attention(self._attention(res))
                rec = bind_self_attention(model, args, self.radial)
                rec.update(kernel=res.kernel, resolution=res.as_dict(), fallback=res.fallback,
                           kernels={s: b.key for s, b in model.backends.items()})
                if mesh is not None:
                    model.set_parallel(mesh)
                    rec["transport"] = transport(lay, mesh)
                made["runner"] = ModelRunner(model, mesh=mesh)
                return rec

            return prepare

        def steps():
            return made["runner"].denoise_iter(self.enc, noise=self.noise)

        try:
            resolution(False)
        except BackendUnavailableError as e:
            self.report["unavailable"][t] = str(e)
            if self.rank == 0:
                print(f"[bench step] {t}: unavailable ({e})", flush=True)
            return
        ours = {"attn_type": t}
        base = self._entry("ditfleet", t, SINGLE, steps, solo=True, base=None, extra=ours, prepare=setup(SINGLE))
        for lay in self.layouts:
            self._entry("ditfleet", t, lay, steps, solo=False, base=base, extra=ours, prepare=setup(lay))
        made.clear()
        model.set_parallel(None)

    def run_diffusers(self) -> None:
        from .peers import DiffusersStep, diffusers_unavailable

        args = self.args
        peer = self.report["peers"]["diffusers"] = {"kernel": args.diffusers_kernel}
        why = diffusers_unavailable(context_parallel=False)
        if why:
            peer.update(status="skipped", why=why)
            return
        made: dict = {}  # the peer of the current entry (built in its set-up, dropped after it)

        cp_why = diffusers_unavailable(context_parallel=True)

        def prepare(ring=1, ulysses=1):
            def build():
                if ring * ulysses > 1 and cp_why:
                    raise RuntimeError(f"not run: {cp_why}")
                made["step"] = DiffusersStep(self.model, self.dtype, kernel=args.diffusers_kernel, ring=ring,
                                             ulysses=ulysses)
                return made["step"].describe()

            return build

        def steps():
            return made["step"].denoise_iter(self.enc, noise=self.noise)

        extra = {"peer": "diffusers"}
        base = self._entry("diffusers", "diffusers", SINGLE, steps, solo=True, base=None, extra=extra,
                           prepare=prepare())
        ours = next((e for e in self.report["entries"] if e["kind"] == "ditfleet" and e["layout"] == SINGLE.name
                     and e.get("status") == "ok" and e["attn_type"] in EXACT_TYPES), None)  # a dense exact kernel
        if self.rank == 0 and ours is not None and base.get("status") == "ok":
            base["rel_l2_vs_ditfleet_1gpu"] = rel_l2(base["_latents"], ours["_latents"])
            base["rel_l2_reference"] = ours["label"]
        made.clear()
        for lay in [lay for lay in self.layouts if lay.cfg == 1]:
            self._entry("diffusers", "diffusers", lay, steps, solo=False, base=base, extra=extra,
                        prepare=prepare(lay.ring, lay.ulysses))
            made.clear()
        peer["status"] = "ran"
        peer["note"] = ("cfg-parallel layouts are not run: Diffusers' context parallelism splits the sequence only; "
                        "entries of kind 'diffusers' hold its step times")

    def run(self) -> int:
        for t in attn_types(self.args, self.device, self.dtype):
            self.run_type(t)
        if "diffusers" in self.args.peers:
            self.run_diffusers()
        if "xfuser" in self.args.peers:
            from .peers import xfuser_status

            self.report["peers"]["xfuser"] = xfuser_status()
        self.report["summary"] = summarize(self.report["entries"])
        self.report["complete"] = True
        if self.rank == 0:
            self.report["plot"] = plot(self.report, self.out.with_suffix(".png"))
        self.save()
        if self.rank == 0:
            print(f"[bench step] wrote {self.out}" + (f" and {self.report['plot']['path']}"
                                                      if self.report["plot"].get("path") else ""), flush=True)
        return 0 if any(e.get("status") == "ok" and e["kind"] == "ditfleet" for e in self.report["entries"]) else 1


def summarize(entries: list[dict]) -> dict:
    """Per label (attention type, or ``diffusers``): the 1-GPU s/step, each layout's speedup / efficiency, the
    fastest layout; for ditfleet's types also their 1-GPU step over Diffusers' (``step_vs_diffusers_1gpu``)."""
    out: dict = {}
    ok = [e for e in entries if e.get("status") == "ok" and "s_per_step" in e]
    diff_1 = next((e for e in ok if e["kind"] == "diffusers" and e["layout"] == SINGLE.name), None)
    for e in ok:
        s = out.setdefault(e["label"], {"kind": e["kind"], "layouts": {}})
        if e["layout"] == SINGLE.name:
            s["s_per_step_1gpu"] = e["s_per_step"]
            if diff_1 is not None and e["kind"] == "ditfleet":
                s["step_vs_diffusers_1gpu"] = e["s_per_step"] / diff_1["s_per_step"]
            continue
        s["layouts"][e["layout"]] = {"s_per_step": e["s_per_step"], "speedup": e.get("speedup"),
                                     "efficiency": e.get("efficiency")}
        if "best_s_per_step" not in s or e["s_per_step"] < s["best_s_per_step"]:
            s.update(best_layout=e["layout"], best_s_per_step=e["s_per_step"], best_speedup=e.get("speedup"),
                     best_efficiency=e.get("efficiency"))
    return out


def plot(report: dict, path: Path) -> dict:
    """steps/s against GPUs per attention type (and Diffusers), with each type's ideal line; ``{"path"}`` or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return {"path": None, "why": f"matplotlib not importable: {e}"}
    ok = [e for e in report["entries"] if e.get("status") == "ok" and "steps_per_s" in e]
    if not ok:
        return {"path": None, "why": "no entry ran"}
    world = report["environment"]["world_size"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(e["label"] for e in ok):
        mine = [e for e in ok if e["label"] == label]
        name = label if mine[0]["kind"] == "diffusers" else f"ditfleet {label}"
        line = ax.plot([e["gpus"] for e in mine], [e["steps_per_s"] for e in mine], "o", label=name)[0]
        for e in mine:
            ax.annotate(e["layout"], (e["gpus"], e["steps_per_s"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        base = next((e for e in mine if e["layout"] == SINGLE.name), None)
        if base is not None:
            ax.plot([1, world], [base["steps_per_s"], base["steps_per_s"] * world], "--", color=line.get_color(),
                    alpha=0.6, label=f"{name} ideal (x GPUs)")
    cfg = report["config"]
    ax.set_xticks(range(1, world + 1))
    ax.set_xlabel("GPUs")
    ax.set_ylabel("denoising steps / s (CFG on)")
    ax.set_title(f"{cfg['model']} {cfg['video']} ({cfg['tokens']:,} tokens) on {report['environment']['card']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"path": str(path)}


def row(e: dict) -> str:
    head = f"{e['kind']:<9} {e['label']:<14} {e['layout']:<16} {e['gpus']:>2} GPU"
    if e.get("status") != "ok":
        return f"{head}  {e.get('status')}: {e.get('error', '')[:120]}"
    parts = [head, f"{e['s_per_step']:9.4f} s/step"]
    if e.get("speedup") is not None:
        parts.append(f"{e['speedup']:5.2f}x (eff {e['efficiency']:.2f})")
    if e.get("rel_l2_vs_1gpu") is not None:
        parts.append(f"rel L2 {e['rel_l2_vs_1gpu']:.1e}")
    peaks = [p for p in e.get("peak_mem_gib_per_rank") or [] if p is not None]
    if peaks:
        parts.append(f"peak {max(peaks):.1f} GiB")
    if e.get("kernel") or e.get("attention_backend"):
        parts.append(f"[{e.get('kernel') or e['attention_backend']}]")
    if e.get("transport"):
        parts.append(", ".join(f"{k} {v}" for k, v in e["transport"].items() if k in ("sp", "cfg")))
    return "  ".join(parts)


# ---- launchers ------------------------------------------------------------------------------------------------
def run_rank(args, launcher: dict) -> int:
    """One rank: join the world (torchrun's environment, or none: a world of one), run, leave."""
    from ..parallel import init_distributed

    backend = "gloo" if args.device == "cpu" or not torch.cuda.is_available() else None
    owns = not dist.is_initialized()  # a caller's group (tests) is left to the caller
    env = init_distributed(backend=backend, timeout_s=args.timeout_s)
    try:
        return Bench(args, env, {**launcher, "world_size": env.world_size, "backend": env.backend}).run()
    finally:
        try:
            from ..parallel.copy_engine import release_all

            release_all()
        except ImportError:
            pass
        if owns:
            if env.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()


class StepRank:
    """A Ray actor running :func:`run_rank` with the environment a torchrun rank would have."""

    def info(self) -> dict:
        """Node IP, GPU ids (before any CUDA call), pid, and a free port here (the rendezvous port of rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return {"ip": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                    "pid": os.getpid(), "port": s.getsockname()[1]}

    def run(self, argv: dict, env: dict, launcher: dict) -> int:
        os.environ.update(env)
        return run_rank(argparse.Namespace(**argv), launcher)


def launch_ray(args) -> int:
    """``--launcher ray``: ``--world-size`` actors in one STRICT_PACK placement group (one GPU each where the
    cluster has them), ranks ordered by GPU id; each gets torchrun's variables and runs :func:`run_rank`."""
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError as e:
        raise UserError(f"--launcher ray needs Ray (pip install 'ditfleet[ray]'): {e}") from None
    from ..config import RayConfig
    from ..engine.ray_executor import ray_init_kwargs

    n, owns = args.world_size, not ray.is_initialized()
    if owns:
        ray.init(**ray_init_kwargs(RayConfig(), world_size=n))
    gpu = args.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= n
    bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="STRICT_PACK")
    actors = []
    try:
        if not ray.wait([pg.ready()], timeout=args.timeout_s)[0]:
            raise UserError(f"Ray could not place {n} x {bundle} on one node within {args.timeout_s:g} s")
        remote = ray.remote(StepRank)
        actors = [remote.options(num_cpus=1, num_gpus=1 if gpu else 0,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(
                                     placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(n)]
        infos = ray.get([a.info.remote() for a in actors], timeout=args.timeout_s)
        order = sorted(range(n), key=lambda i: ([int(g) if g.isdigit() else g for g in infos[i]["gpus"]], i))
        gpu_ids = sorted({g for i in infos for g in i["gpus"]}, key=lambda g: int(g) if g.isdigit() else g)
        argv = {k: v for k, v in vars(args).items() if k not in ("func",)}
        argv.update(launcher="torchrun", world_size=None, cwd=os.getcwd())
        refs = []
        for rank, i in enumerate(order):
            env = {"RANK": str(rank), "WORLD_SIZE": str(n), "MASTER_ADDR": infos[order[0]]["ip"],
                   "MASTER_PORT": str(infos[order[0]]["port"]),
                   "LOCAL_RANK": str(gpu_ids.index(infos[i]["gpus"][0]) if gpu else rank)}
            if gpu:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
            launcher = {"launcher": "ray", "ray": ray.__version__, "placement": f"STRICT_PACK {n} x {bundle}",
                        "actor_pids": [infos[j]["pid"] for j in order]}
            refs.append(actors[i].run.remote(argv, env, launcher))
        try:
            return max(ray.get(refs))  # a dead actor fails this at once; a hung collective is bounded by --timeout-s
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), UserError):
                raise e.cause from None
            raise
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)
        if owns:
            ray.shutdown()


def main(args) -> int:
    """Entry point: check the command line, then run this rank (torchrun / one process) or start the Ray actors."""
    check_args(args)
    if args.launcher == "ray":
        return launch_ray(args)
    from ..engine.torchrun import torchrun_env

    return run_rank(args, {"launcher": "torchrun" if torchrun_env() else "in-process (world of one)"})

