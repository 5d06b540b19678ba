"""``ditfleet bench dit``: one Wan2.1 DiT block and the full DiT forward at video shapes.

Default: Wan2.1-14B shapes (dim 5120, 40 heads, FFN 13824, 40 layers) in bf16 with random
weights built directly on the GPU, a 720p x 81-frame input (latent ``[1, 16, 21, 90, 160]``,
75,600 tokens). For each self-attention kernel (``--kernels``; every site uses it) it measures:

* ``attention_ms``: the kernel alone on the block's q, k, v shapes;
* ``block_linears_ms``: the block's linear layers alone (q, k, v, o; cross q, k, v, o; FFN);
* ``block_ms``: one whole block (``WanBlock.forward``, folding in the previous block's FFN residual);
* ``forward``: the full DiT forward (embeddings, all blocks, head, unpatchify), with its peak memory.

With ``--diffusers``, Diffusers' ``WanTransformer3DModel`` with the same config runs in the same
process, on the *same weights* (its parameters are ours, renamed; the few it keeps in another
dtype are cast copies), under ``sdpa_kernel(CUDNN_ATTENTION)`` (``--diffusers-kernel``): block and
forward time, peak memory, and the rel L2 between its output and ours with ``sdpa_cudnn``.
``--tiny`` runs a tiny config on CPU (a smoke test of this suite).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
from pathlib import Path

import torch

from ..attention import registry
from ..errors import UserError
from .attention import card_slug, kernel_availability, time_cpu
from .common import environment, rel_l2, select_device, time_cuda, write_json

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = ("t2v-14b", "i2v-14b", "t2v-1.3b")
DEFAULT_KERNELS = ("fa4", "sdpa_cudnn")
GIB = float(1 << 30)
FULL_SHAPE = (81, 720, 1280)  # frames, height, width
TINY_SHAPE = (9, 64, 96)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options on ``parser`` (the ``ditfleet bench dit`` subparser)."""
    parser.add_argument("--model", choices=MODELS, default="t2v-14b", help="model shapes (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="blocks in the DiT (default: the model's, 40 for 14B)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (default: 81; --tiny: 9)")
    parser.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (default: 720; --tiny: 64)")
    parser.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (default: 1280; --tiny: 96)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="KEY",
                        help=f"attention kernels to run (default: the available ones of {', '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed full forwards (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed full forwards (default: %(default)s)")
    parser.add_argument("--block-warmup", type=int, default=2, help="untimed block calls (default: %(default)s)")
    parser.add_argument("--block-iters", type=int, default=5, help="timed block calls (default: %(default)s)")
    parser.add_argument("--skip-forward", action="store_true", help="time the block only")
    parser.add_argument("--diffusers", action="store_true",
                        help="also run Diffusers' WanTransformer3DModel (same config and weights) for comparison")
    parser.add_argument("--diffusers-kernel", choices=("cudnn", "flash", "efficient", "default"), default="cudnn",
                        help="torch SDPA backend Diffusers runs with (default: %(default)s)")
    parser.add_argument("--eager", action="store_true", help="run the fused elementwise ops eagerly (no torch.compile)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and video (CPU smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available; cpu needs --tiny)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/dit_<card-slug>.json)")


# ---- set-up -----------------------------------------------------------------------------------------
def model_config(args):
    from ..models.wan import WanDiTConfig

    if args.tiny:
        cfg = WanDiTConfig(model_type="i2v" if args.model.startswith("i2v") else "t2v",
                           in_dim=36 if args.model.startswith("i2v") else 16,
                           dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=64, freq_dim=32, image_dim=32)
    else:
        cfg = {"t2v-14b": WanDiTConfig.t2v_14b, "i2v-14b": WanDiTConfig.i2v_14b, "t2v-1.3b": WanDiTConfig.t2v_1_3b}[args.model]()
    if args.layers is not None:
        if args.layers < 1:
            raise UserError(f"--layers must be >= 1, got {args.layers}")
        cfg = cfg.replace(num_layers=args.layers)
    return cfg


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan VAE latent ``(F, H, W)`` of a video: time / 4 (+1), space / 8."""
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"--frames must be 4n+1, got {frames}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise UserError(f"--{name} must be a positive multiple of 16, got {v}")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def _device(args) -> torch.device:
    device = select_device(args.device)
    if device.type == "cpu" and not args.tiny:
        raise UserError("bench dit at real model sizes needs a CUDA GPU; pass --tiny for a CPU smoke run")
    return device


def make_inputs(cfg, lat: tuple[int, int, int], device, dtype, seed: int) -> dict:
    """Random DiT inputs: ``x`` ``[1, 16, F, H, W]``, ``t``, 512 text tokens, and CLIP / ``y`` for I2V."""
    g = torch.Generator(device=device).manual_seed(seed + 1)
    f, h, w = lat
    inp = {
        "x": torch.randn(1, 16, f, h, w, generator=g, device=device, dtype=dtype),
        "t": torch.tensor([999.0], device=device),
        "context": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype),
    }
    if cfg.has_image_branch:
        inp["clip_fea"] = torch.randn(1, 257, cfg.image_dim, generator=g, device=device, dtype=dtype)
        inp["y"] = torch.randn(1, cfg.in_dim - 16, f, h, w, generator=g, device=device, dtype=dtype)
    return inp


def _timer(device: torch.device):
    return time_cuda if device.type == "cuda" else time_cpu


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ---- measurements -----------------------------------------------------------------------------------
def block_linears(block, h: torch.Tensor, ctx: torch.Tensor, ctx_img: torch.Tensor | None):
    """A callable running exactly the block's linear layers on inputs of the block's shapes."""
    sa, ca = block.self_attn, block.cross_attn
    fc1, fc2 = block.ffn[0], block.ffn[2]

    def run():
        for lin in (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o):
            lin(h)
        ca.k(ctx), ca.v(ctx)
        if ctx_img is not None:
            ca.k_img(ctx_img), ca.v_img(ctx_img)
        fc2(fc1(h))

    return run


def linear_flops(cfg, tokens: int) -> float:
    """Matmul FLOPs of one block's linear layers (video tokens; the 512 / 257 context rows included)."""
    c, n_ctx = cfg.dim, cfg.text_len + (257 if cfg.has_image_branch else 0)
    return 2.0 * (tokens * (6 * c * c + 2 * c * cfg.ffn_dim) + n_ctx * 2 * c * c)


def bench_ours(model, inputs: dict, args, device) -> dict:
    """Attention alone, block linears alone, one block, and (unless ``--skip-forward``) the full forward."""
    from ..models.wan.dit import SELF_SITE

    timer = _timer(device)
    cfg = model.config
    rec: dict = {}
    with torch.inference_mode():
        step = model.prepare(**inputs)
        block = model.blocks[0]
        b, s, c = step.tokens.shape
        hd = cfg.head_dim
        g = torch.Generator(device=device).manual_seed(args.seed + 2)
        q, k, v = (torch.randn(b, s, cfg.num_heads, hd, generator=g, device=device, dtype=model.dtype) for _ in range(3))
        backend = model.backends[SELF_SITE]
        rec["attention"] = timer(lambda: backend(q, k, v), warmup=args.block_warmup, iters=args.block_iters)
        del q, k, v
        h = torch.randn(b, s, c, generator=g, device=device, dtype=model.dtype)
        rec["block_linears"] = timer(block_linears(block, h, step.ctx, step.ctx_img),
                                     warmup=args.block_warmup, iters=args.block_iters)
        rec["block_linears"]["tflops"] = linear_flops(cfg, s) / (rec["block_linears"]["median_ms"] * 1e-3) / 1e12
        del h
        _reset_peak(device)
        x = step.tokens
        _, carry = block(x, None, *step.block_args)  # a previous block's deferred FFN residual, as in the forward
        rec["block"] = timer(lambda: block(x, carry, *step.block_args), warmup=args.block_warmup, iters=args.block_iters)
        rec["block"]["peak_mem_gib"] = _peak(device)
        del step, x, carry
        if not args.skip_forward:
            _reset_peak(device)
            rec["forward"] = timer(lambda: model(**inputs), warmup=args.warmup, iters=args.iters)
            rec["forward"]["peak_mem_gib"] = _peak(device)
    rec["attention_ms"] = rec["attention"]["median_ms"]
    rec["block_linears_ms"] = rec["block_linears"]["median_ms"]
    rec["block_ms"] = rec["block"]["median_ms"]
    rec["block_other_ms"] = rec["block_ms"] - rec["attention_ms"] - rec["block_linears_ms"]
    if "forward" in rec:
        rec["forward_s"] = rec["forward"]["median_ms"] / 1e3
        rec["peak_mem_gib"] = rec["forward"]["peak_mem_gib"]
    return rec


def build_diffusers(model, dtype: torch.dtype):
    """Diffusers' ``WanTransformer3DModel`` sharing ``model``'s weights (renamed; dtype-mismatched ones cast).

    Built on ``meta`` and assigned, so it costs no init time and, apart from the cast copies (time
    projection, head, q/k norms), no memory. The float64 RoPE tables are built as Diffusers does.
    """
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from ..models.wan import official_to_diffusers

    cfg = model.config
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        dm = WanTransformer3DModel(**kwargs)
    keep = tuple(dm._keep_in_fp32_modules or ())
    state = {}
    for name, p in model.named_parameters():
        dname = official_to_diffusers(name)
        want = torch.float32 if any(m in dname.split(".") for m in keep) else dtype
        state[dname] = p if p.dtype == want else p.detach().to(want)
    dm.load_state_dict(state, strict=True, assign=True)
    dm.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(model.device)
    return dm.eval().requires_grad_(False)


def _sdpa_context(kind: str, device: torch.device):
    if kind == "default" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[kind])


def bench_diffusers(dm, inputs: dict, args, device) -> tuple[dict, torch.Tensor | None]:
    """Block and full-forward time of the Diffusers model; returns ``(record, output)``."""
    timer = _timer(device)
    x = inputs["x"] if "y" not in inputs else torch.cat([inputs["x"], inputs["y"]], dim=1)
    dtype = dm.proj_out.weight.dtype
    x = x.to(dtype)
    ctx, t, clip = inputs["context"].to(dtype), inputs["t"], inputs.get("clip_fea")
    rec: dict = {}
    out = None
    with torch.inference_mode(), _sdpa_context(args.diffusers_kernel, device):
        rotary = dm.rope(x)
        hs = dm.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, tproj, ehs, ehs_img = dm.condition_embedder(t, ctx, None if clip is None else clip.to(dtype))
        tproj = tproj.unflatten(1, (6, -1))
        if ehs_img is not None:
            ehs = torch.concat([ehs_img, ehs], dim=1)
        block = dm.blocks[0]
        _reset_peak(device)
        rec["block"] = timer(lambda: block(hs, ehs, tproj, rotary), warmup=args.block_warmup, iters=args.block_iters)
        rec["block"]["peak_mem_gib"] = _peak(device)
        del rotary, hs, temb, tproj, ehs, ehs_img
        if not args.skip_forward:
            _reset_peak(device)

            def fwd():
                return dm(x, t, ctx, encoder_hidden_states_image=None if clip is None else clip.to(dtype), return_dict=False)[0]

            rec["forward"] = timer(fwd, warmup=args.warmup, iters=args.iters)
            rec["forward"]["peak_mem_gib"] = _peak(device)
            out = fwd().float()
    rec["block_ms"] = rec["block"]["median_ms"]
    if "forward" in rec:
        rec["forward_s"] = rec["forward"]["median_ms"] / 1e3
        rec["peak_mem_gib"] = rec["forward"]["peak_mem_gib"]
    return rec, out


# ---- main -----------------------------------------------------------------------------------------
def _fmt_row(name: str, r: dict) -> str:
    if r.get("status") != "ok":
        return f"{name:<22} failed: {r.get('error', '').splitlines()[0][:100] if r.get('error') else r.get('status')}"
    parts = [f"{name:<22}"]
    for key, label in (("attention_ms", "attn"), ("block_linears_ms", "linears"), ("block_ms", "block")):
        if key in r:
            parts.append(f"{label} {r[key]:8.2f} ms")
    if "forward_s" in r:
        parts.append(f"forward {r['forward_s']:7.3f} s")
    if r.get("peak_mem_gib") is not None:
        parts.append(f"peak {r['peak_mem_gib']:.1f} GiB")
    return "  ".join(parts)


def main(args: argparse.Namespace) -> int:
    """Run the suite; write JSON and print a table. Returns 0 if any configuration ran, else 1."""
    from ..models.wan import build_dit
    from ..models.wan.dit import IMAGE_SITE, SELF_SITE, TEXT_SITE
    from ..models.wan.ops import fused_mode, set_compile

    set_compile(not args.eager)
    for name in ("iters", "block_iters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = _device(args)
    dtype = DTYPES[args.dtype]
    cfg = model_config(args)
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    frames, height, width = (v if v is not None else d for v, d in zip((args.frames, args.height, args.width), shape))
    lat = latent_shape(frames, height, width)
    tokens = math.prod(n // p for n, p in zip(lat, cfg.patch_size))

    keys = list(args.kernels) if args.kernels else (["sdpa_cpu_flash"] if device.type == "cpu" else list(DEFAULT_KERNELS))
    unknown = [k for k in keys if k not in registry.KERNELS]
    if unknown:
        raise UserError(f"--kernels: unknown kernel {', '.join(unknown)}; known: {', '.join(registry.KERNELS)}")
    runnable, unavailable = kernel_availability(keys, device, dtype, cfg.head_dim)
    for key, reasons in unavailable.items():
        print(f"[bench dit] {key}: unavailable ({'; '.join(reasons)})")
    if not runnable:
        raise UserError(f"none of the kernels {', '.join(keys)} can run here: " +
                        "; ".join(f"{k}: {', '.join(r)}" for k, r in unavailable.items()))

    env = environment()
    env["device"] = str(device)
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    out_path = Path(args.out or f"benchmarks/results/dit_{card_slug(env['card'])}.json")
    print(f"[bench dit] {args.model}{' (tiny)' if args.tiny else ''}: dim {cfg.dim}, {cfg.num_heads} heads, "
          f"{cfg.num_layers} layers, FFN {cfg.ffn_dim}; video {frames}x{height}x{width} -> latent {list(lat)} -> "
          f"{tokens:,} tokens; {args.dtype} on {env['card']}; fused ops: {fused_mode() if device.type == 'cuda' else 'eager'}",
          flush=True)

    _reset_peak(device)
    first = next(iter(runnable.values()))(device=device, dtype=dtype)
    sites = (SELF_SITE, TEXT_SITE, IMAGE_SITE) if cfg.has_image_branch else (SELF_SITE, TEXT_SITE)
    model = build_dit(cfg, device=device, dtype=dtype, attention={s: first for s in sites}, seed=args.seed, std=0.02)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    inputs = make_inputs(cfg, lat, device, dtype, args.seed)

    results: dict[str, dict] = {}
    reference: tuple[str, torch.Tensor] | None = None  # (kernel, our output) to compare Diffusers with
    for key, cls in runnable.items():
        rec: dict = {"kernel": key, "description": cls.description}
        try:
            backend = cls(device=device, dtype=dtype)
            model.set_attention({s: backend for s in sites})
            rec.update(bench_ours(model, inputs, args, device))
            rec["status"] = "ok"
            if args.diffusers and not args.skip_forward and (reference is None or key == "sdpa_cudnn"):
                with torch.inference_mode():
                    reference = (key, model(**inputs).float())
        except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        results[key] = rec
        print("[bench dit] " + _fmt_row(f"ditfleet/{key}", rec), flush=True)
        _reset_peak(device)

    diff: dict | None = None
    if args.diffusers:
        diff = {"attention": f"torch SDPA ({args.diffusers_kernel})"}
        try:
            dm = build_diffusers(model, dtype)
            rec, out = bench_diffusers(dm, inputs, args, device)
            diff.update(rec, status="ok")
            if out is not None and reference is not None:
                diff["rel_l2_vs_ditfleet"] = rel_l2(out, reference[1])
                diff["rel_l2_reference_kernel"] = reference[0]
            del dm, out
        except ImportError as e:
            diff.update(status="skipped", error=f"diffusers not importable: {e}")
        except Exception as e:  # noqa: BLE001
            diff.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        print("[bench dit] " + _fmt_row("diffusers", diff)
              + (f"  rel L2 vs ditfleet/{diff['rel_l2_reference_kernel']} {diff['rel_l2_vs_ditfleet']:.2e}"
                 if "rel_l2_vs_ditfleet" in diff else ""), flush=True)
        _reset_peak(device)

    ok = [r for r in results.values() if r["status"] == "ok" and "forward_s" in r]
    summary = {}
    if ok:
        best = min(ok, key=lambda r: r["forward_s"])
        summary = {"fastest_kernel": best["kernel"], "fastest_forward_s": best["forward_s"]}
        if diff and diff.get("forward_s"):
            summary["diffusers_forward_s"] = diff["forward_s"]
            summary["speedup_vs_diffusers"] = {r["kernel"]: diff["forward_s"] / r["forward_s"] for r in ok}
    payload = {
        "suite": "dit",
        "environment": env,
        "config": {
            "model": args.model, "tiny": args.tiny, "model_config": dataclasses.asdict(cfg),
            "video": {"frames": frames, "height": height, "width": width}, "latent": [1, 16, *lat], "tokens": tokens,
            "dtype": args.dtype, "device": str(device), "weights": "random N(0, 0.02), built on the device",
            "weights_gib": weights_gib, "fused_ops": fused_mode() if device.type == "cuda" else "eager",
            "kernels": keys, "sites": "every attention site runs the kernel under test",
            "warmup": args.warmup, "iters": args.iters, "block_warmup": args.block_warmup, "block_iters": args.block_iters,
            "seed": args.seed,
            "timing": "CUDA events, median; block = WanBlock.forward on block 0 with the forward's inputs",
            "peak_mem_gib": "torch.cuda.max_memory_allocated during the timed calls, weights included",
        },
        "unavailable": unavailable,
        "results": list(results.values()),
        "diffusers": diff,
        "summary": summary,
    }
    write_json(out_path, payload)
    if summary:
        line = f"[bench dit] fastest: {summary['fastest_kernel']} {summary['fastest_forward_s']:.3f} s per forward"
        if "diffusers_forward_s" in summary:
            line += f" (diffusers {summary['diffusers_forward_s']:.3f} s)"
        print(line)
    print(f"[bench dit] wrote {out_path}")
    return 0 if any(r["status"] == "ok" for r in results.values()) else 1
