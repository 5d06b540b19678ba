"""``ditfleet bench dit``: one Wan2.1 DiT block and the full DiT forward at video shapes.

Default: Wan2.1-14B shapes (dim 5120, 40 heads, FFN 13824, 40 layers) in bf16 with random
weights built directly on the GPU, a 720p x 81-frame input (latent ``[1, 16, 21, 90, 160]``,
75,600 tokens). It runs a list of configurations, one after the other on the same model:

* ``--kernels KEY ...``: a kernel key of the registry (``fa4``, ``sdpa_cudnn`` ...) at every site;
* ``--attn-types TYPE ...``: a config attention type (``sage_attn2``, ``sparge``, ``radial_attn``,
  ``flash_attn3`` ...) at the self-attention site, resolved by :func:`ditfleet.attention.registry.resolve`
  exactly as a run resolves ``self_attn_1_type`` (the resolved kernel and any fallback are recorded);
  the cross-attention sites run the dense ``--cross-kernel`` (default FlashAttention-4 where it runs,
  else the kernel ``torch_sdpa`` resolves to: cuDNN on a GPU). Radial attention is bound as the engine
  binds it (a self-attention policy with the config's ``radial_attn_setting``: decay 0.2, block 128,
  ``dense_timesteps`` 0, ``dense_layers`` 0, i.e. every block radial; ``set_step(0)``); Sparge in
  top-k mode (``--sparge-topk``, every block bound with ``layer_params(..., topk=...)`` as
  :func:`ditfleet.engine.sparge_weights.bind_sparge` does without a checkpoint).

For each configuration it measures:

* ``attention_ms``: block 0's self-attention alone (as the forward calls it: radial with block 0's
  mask, Sparge with its predictor) on random q, k, v of the block's shapes;
* ``block_linears_ms``: the block's linear layers alone (q, k, v, o; cross q, k, v, o; FFN);
* ``block_ms``: one whole block (``WanBlock.forward``, folding in the previous block's FFN residual);
* ``forward``: the full DiT forward (embeddings, all blocks, head, unpatchify), with its peak memory.

With ``--quant none,fp8`` (``dit_quantized``'s schemes, :mod:`ditfleet.models.quant`) every configuration
runs once per entry, in order, on the same model and inputs: ``none`` (the compute dtype) first, then the
model's declared linears are quantised in place (their bf16 weights freed: the fp8 rows' peak memory is
the quantised model's) and every configuration runs again, labelled ``<label>+fp8``. A quantised record
has the ``cosine`` and ``rel_l2`` of its DiT output against the unquantised record of the same
configuration (same random weights and inputs), and ``summary.quant`` the speed-ups of the linears, the
block and the forward. Its ``block_linears`` feeds q / k / v, cross q and the first FFN linear one
pre-quantised input (the norm before them emits it in the forward); o and cross o quantise their input
inside, and the FFN runs its fused GELU + quantisation (the bf16 record's FFN has no GELU).

With ``--diffusers``, Diffusers' ``WanTransformer3DModel`` with the same config runs in the same
process, on the *same weights* (its parameters are ours, renamed; the few it keeps in another
dtype are cast copies), under ``sdpa_kernel(CUDNN_ATTENTION)`` (``--diffusers-kernel``): block and
forward time, peak memory, and the rel L2 between its output and ours with ``sdpa_cudnn``.
``--tiny`` runs a tiny config on CPU (a smoke test of this suite). ``summary.forward_vs_reference``
is each forward's time over the reference's (the first dense FlashAttention-4 configuration, else
cuDNN, else the first that ran).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..attention import registry
from ..errors import BackendUnavailableError, UserError
from ..config import RadialAttnSetting
from .attention import card_slug, kernel_availability, time_cpu
from .common import environment, rel_l2, select_device, time_cuda, write_json

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = ("t2v-14b", "i2v-14b", "t2v-1.3b")
DEFAULT_KERNELS = ("fa4", "sdpa_cudnn")
GIB = float(1 << 30)
FULL_SHAPE = (81, 720, 1280)  # frames, height, width
TINY_SHAPE = (9, 64, 96)
SELF_SITE_KEY = "self_attn_1_type"  # ditfleet.models.wan.dit.SELF_SITE, the registry's self-attention site
RADIAL_DEFAULTS = RadialAttnSetting()  # the config's defaults (decay 0.2, block 128, no dense steps / layers)
EXACT_TYPES = (None, "torch_sdpa", "flash_attn2", "flash_attn3", "flash_attn4")  # dense, unquantised: Diffusers' reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options on ``parser`` (the ``ditfleet bench dit`` subparser)."""
    parser.add_argument("--model", choices=MODELS, default="t2v-14b", help="model shapes (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="blocks in the DiT (default: the model's, 40 for 14B)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 4n+1 (default: 81; --tiny: 9)")
    parser.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (default: 720; --tiny: 64)")
    parser.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (default: 1280; --tiny: 96)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="KEY",
                        help="attention kernels to run at every site (default, without --attn-types: the available "
                             f"ones of {', '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--attn-types", nargs="+", default=None, metavar="TYPE",
                        help="config attention types to run at the self-attention site (self_attn_1_type), resolved as "
                             f"a run resolves them: {', '.join(registry.ATTN_TYPES)}")
    parser.add_argument("--cross-kernel", default=None, metavar="KEY",
                        help="dense kernel of the cross-attention sites with --attn-types (default: fa4 where it runs, "
                             "else the torch_sdpa kernel here, cuDNN on a GPU)")
    parser.add_argument("--sparge-topk", type=float, default=0.5,
                        help="sparge: fraction of key blocks kept per query block (top-k mode; default: %(default)s)")
    parser.add_argument("--radial-decay", type=float, default=RADIAL_DEFAULTS.decay_factor,
                        help="radial_attn: radial_attn_setting.decay_factor (default: %(default)s)")
    parser.add_argument("--radial-block-size", type=int, default=RADIAL_DEFAULTS.block_size,
                        help="radial_attn: radial_attn_setting.block_size (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed full forwards (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed full forwards (default: %(default)s)")
    parser.add_argument("--block-warmup", type=int, default=2, help="untimed block calls (default: %(default)s)")
    parser.add_argument("--block-iters", type=int, default=5, help="timed block calls (default: %(default)s)")
    parser.add_argument("--skip-forward", action="store_true", help="time the block only")
    parser.add_argument("--diffusers", action="store_true",
                        help="also run Diffusers' WanTransformer3DModel (same config and weights) for comparison")
    parser.add_argument("--diffusers-kernel", choices=("cudnn", "flash", "efficient", "default"), default="cudnn",
                        help="torch SDPA backend Diffusers runs with (default: %(default)s)")
    parser.add_argument("--quant", default="none", metavar="LIST",
                        help="comma-separated: none and / or a dit_quant_scheme (fp8, fp8-vllm, ...); each configuration "
                             "runs once per entry, none first (default: %(default)s)")
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


def _weight_gib(model) -> float:
    """GiB of the model's parameters and buffers (a quantised linear's fp8 weight and scales are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / GIB


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def parse_quant(text: str) -> list[str]:
    """``--quant``: ``none`` and / or schemes of :data:`ditfleet.models.quant.SCHEMES`, ``none`` first, no repeats."""
    from ..models.quant import SCHEMES

    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t != "none" and t not in SCHEMES]
    if not items or bad:
        raise UserError(f"--quant: {', '.join(bad) or repr(text)} is not none or a scheme; valid: none, {', '.join(SCHEMES)}")
    if len(set(items)) != len(items) or ("none" in items and items[0] != "none") or len(items) > 2:
        raise UserError(f"--quant {text}: at most none and one scheme, none first (the model is quantised in place)")
    return items


# ---- measurements -----------------------------------------------------------------------------------
def block_linears(block, h: torch.Tensor, ctx: torch.Tensor, ctx_img: torch.Tensor | None):
    """A callable running exactly the block's linear layers on inputs of the block's shapes.

    Quantised linears (``takes_fp8``): q / k / v, cross q and the first FFN linear take one input quantised
    here, untimed (in the forward, the norm before them emits it in its own pass); o and cross o quantise
    their input inside (as on the attention output); the FFN runs its fused GELU + quantisation in between.
    """
    sa, ca = block.self_attn, block.cross_attn
    fc1, act, fc2 = block.ffn
    if getattr(sa.q, "takes_fp8", False):
        from ..models.wan.ops import quant_rows_op

        hq = quant_rows_op(h)

        def run_quantised():
            for lin in (sa.q, sa.k, sa.v, ca.q):
                lin(hq)
            sa.o(h), ca.o(h)
            ca.k(ctx), ca.v(ctx)
            if ctx_img is not None:
                ca.k_img(ctx_img), ca.v_img(ctx_img)
            fc2(act(fc1(hq)))

        return run_quantised

    def run():
        for lin in (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o):
            lin(h)
        ca.k(ctx), ca.v(ctx)
        if ctx_img is not None:
            ca.k_img(ctx_img), ca.v_img(ctx_img)
        fc2(fc1(h))

    return run


def _sparsity(model, step, q: torch.Tensor, k: torch.Tensor) -> dict:
    """Block densities of the sparse self-attention, if any (not timed; reads back to the host).

    Radial: block 0's mask and the mean over blocks. Sparge: block 0's predicted mask for ``q``, ``k``
    ``[B, S, H, D]`` (the random inputs its attention is timed on).
    """
    out: dict = {}
    masks = [m for m in step.self_masks if m is not None]
    if masks:
        out["radial_density_block0"] = step.self_masks[0].density if step.self_masks[0] is not None else 1.0
        out["radial_density_mean"] = sum(1.0 if m is None else m.density for m in step.self_masks) / len(step.self_masks)
    layers = model.policy.layers if model.policy is not None else None
    if layers and layers[0].params is not None:
        from ..attention.sparge import predict_block_mask

        out["sparge_density_block0"] = predict_block_mask(q, k, layers[0].params).density
    return out


def linear_flops(cfg, tokens: int) -> float:
    """Matmul FLOPs of one block's linear layers (video tokens; the 512 / 257 context rows included)."""
    c, n_ctx = cfg.dim, cfg.text_len + (257 if cfg.has_image_branch else 0)
    return 2.0 * (tokens * (6 * c * c + 2 * c * cfg.ffn_dim) + n_ctx * 2 * c * c)


def bench_ours(model, inputs: dict, args, device, keep_output: dict | None = None) -> dict:
    """Attention alone, block linears alone, one block, and (unless ``--skip-forward``) the full forward;
    ``keep_output`` (a dict) receives the last timed forward's output as ``"out"``."""
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
        self_attention = step.attend.self_attention  # block 0's, as the forward calls it (radial mask, Sparge layer)
        rec["attention"] = timer(lambda: self_attention(q, k, v), warmup=args.block_warmup, iters=args.block_iters)
        rec.update(_sparsity(model, step, q, k))
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
            if keep_output is None:
                rec["forward"] = timer(lambda: model(**inputs), warmup=args.warmup, iters=args.iters)
            else:  # the previous output stays alive during a call: one output more in the peak, both precisions
                rec["forward"] = timer(lambda: keep_output.__setitem__("out", model(**inputs)), warmup=args.warmup,
                                       iters=args.iters)
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


# ---- configurations ---------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchRun:
    """One configuration: a kernel key at every site (``attn_type`` None) or a config type at self-attention.

    Attributes:
        label: name in the results (the kernel key or the type name).
        kernel: key of the self-attention kernel that runs.
        description: that kernel's description.
        attention: ``sites -> {site: backend}`` (builds kernel backends on call; the resolved one is reused).
        attn_type: the config type, ``None`` for a ``--kernels`` entry.
        resolution: ``Resolution.as_dict()`` of the self-attention site, for a type.
    """

    label: str
    kernel: str
    description: str
    attention: Callable[[tuple[str, ...]], dict]
    attn_type: str | None = None
    resolution: dict | None = None


def default_cross_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """``(key, why)``: FlashAttention-4 where it runs, else the kernel ``torch_sdpa`` resolves to here."""
    runnable, unavailable = kernel_availability(["fa4"], device, dtype, head_dim)
    if runnable:
        return "fa4", "default: FlashAttention-4 runs here"
    key, _ = registry.torch_sdpa_kernel(device, dtype)
    return key, f"default: fa4 unavailable ({'; '.join(unavailable['fa4'])}), the torch_sdpa kernel here"


def cross_kernel(args, device, dtype, head_dim: int) -> tuple[str, str, type]:
    """``(key, why, class)`` of the cross-attention sites' dense kernel: ``--cross-kernel``, else
    :func:`default_cross_kernel`; refused (UserError) when unknown, unable to run here, or not dense."""
    if args.cross_kernel is None:
        key, why = default_cross_kernel(device, dtype, head_dim)
    else:
        key, why = args.cross_kernel, "--cross-kernel"
        if key not in registry.KERNELS:
            raise UserError(f"--cross-kernel: unknown kernel {key}; known: {', '.join(registry.KERNELS)}")
    runnable, unavailable = kernel_availability([key], device, dtype, head_dim)
    if not runnable:
        raise UserError(f"--cross-kernel {key} cannot run here: {'; '.join(unavailable[key])}")
    cls = runnable[key]
    if cls.caps.block_mask or getattr(cls, "per_layer", False):
        raise UserError(f"--cross-kernel {key}: cross-attention needs a dense kernel, not {cls.description}")
    return key, why, cls


def plan_runs(args, device: torch.device, dtype: torch.dtype, cfg) -> tuple[list[BenchRun], dict, tuple[str, str] | None]:
    """The configurations to run, in order: ``--kernels`` entries, then ``--attn-types`` entries.

    Returns:
        ``(runs, unavailable, cross)``: ``unavailable`` maps a label to its reasons; ``cross`` is
        ``(cross kernel key, why)`` when types run, else ``None``.

    Raises:
        UserError: unknown kernel / type names, bad sparse settings, or nothing can run.
    """
    if args.attn_types is None:
        keys = list(args.kernels) if args.kernels else (["sdpa_cpu_flash"] if device.type == "cpu" else list(DEFAULT_KERNELS))
    else:
        keys = list(args.kernels or [])
    keys = list(dict.fromkeys(keys))
    types = list(dict.fromkeys(args.attn_types or []))
    unknown = [k for k in keys if k not in registry.KERNELS]
    if unknown:
        raise UserError(f"--kernels: unknown kernel {', '.join(unknown)}; known: {', '.join(registry.KERNELS)}")
    unknown = [t for t in types if t not in registry.ATTN_TYPES]
    if unknown:
        raise UserError(f"--attn-types: unknown attention type {', '.join(unknown)}; "
                        f"valid: {', '.join(registry.valid_types(SELF_SITE_KEY))}")
    if not 0 < args.sparge_topk <= 1:
        raise UserError(f"--sparge-topk must lie in (0, 1], got {args.sparge_topk}")
    if args.radial_block_size < 16 or args.radial_block_size % 16:
        raise UserError(f"--radial-block-size must be a positive multiple of 16, got {args.radial_block_size}")
    if not args.radial_decay > 0:
        raise UserError(f"--radial-decay must be > 0, got {args.radial_decay}")

    runs: list[BenchRun] = []
    runnable, unavailable = kernel_availability(keys, device, dtype, cfg.head_dim)
    for key, cls in runnable.items():
        def every_site(sites, cls=cls):
            backend = cls(device=device, dtype=dtype)
            return {s: backend for s in sites}

        runs.append(BenchRun(key, key, cls.description, every_site))
    cross = None
    if types:
        cross_key, why, cross_cls = cross_kernel(args, device, dtype, cfg.head_dim)
        cross = (cross_key, why)
        for t in types:
            label = t if t not in runnable else f"type:{t}"
            try:
                res = registry.resolve(t, site=SELF_SITE_KEY, device=device, dtype=dtype)
            except BackendUnavailableError as e:
                unavailable[label] = [str(e)]
                continue

            def self_and_cross(sites, res=res):
                dense = cross_cls(device=device, dtype=dtype)
                return {s: res.backend if s == SELF_SITE_KEY else dense for s in sites}

            runs.append(BenchRun(label, res.kernel, res.description, self_and_cross, t, res.as_dict()))
    for label, reasons in unavailable.items():
        print(f"[bench dit] {label}: unavailable ({'; '.join(reasons)})")
    if not runs:
        raise UserError(f"none of {', '.join(keys + types)} can run here: " +
                        "; ".join(f"{k}: {', '.join(r)}" for k, r in unavailable.items()))
    return runs, unavailable, cross


def bind_self_attention(model, args, radial: RadialAttnSetting) -> dict:
    """Give ``model`` the self-attention policy of its kernel as the engine does: the radial setting (used by a
    radial kernel only), a Sparge kernel bound per block to ``args.sparge_topk`` (no checkpoint).

    Returns:
        Record fields: the Sparge binding and what runs it, or the radial setting and step.
    """
    from ..models.attention_policy import build_policy

    rec: dict = {}
    c = model.config
    policy = build_policy(model.backends[SELF_SITE_KEY], num_layers=c.num_layers, num_heads=c.num_heads, radial=radial,
                          sparge_topk=args.sparge_topk)
    model.set_policy(policy)
    backend = policy.kernel
    if policy.kind == "sparge":
        first = policy.layers[0]
        rec["sparge"] = {"topk": args.sparge_topk, "bound": policy.describe(),
                         "block": [first.params.block_q, first.params.block_k],
                         "runs": getattr(first, "runs", backend.description)}
    elif policy.kind == "radial":
        # no dense_fallback, as ModelRunner.load: dense blocks / steps (none here) would run the radial kernel unmasked
        rec["radial"] = {**dataclasses.asdict(radial), "step": radial.dense_timesteps, "dense_fallback": None,
                         "runs": getattr(backend, "runs", backend.description)}
    return rec


def forward_reference(ok: list[dict]) -> dict:
    """The record other forwards are compared with: dense FlashAttention-4 at self-attention, else cuDNN, else the first."""
    for key in ("fa4", "sdpa_cudnn"):
        for r in ok:
            if r["kernel"] == key:
                return r
    return ok[0]


def quant_summary(results: dict[str, dict]) -> dict:
    """Per quantised record: its speed-ups over the same configuration unquantised (linears, block, forward),
    output cosine / rel L2 and both peak memories."""
    out = {}
    for r in results.values():
        base = results.get(r.get("base_label") or "")
        if r.get("quant") is None or r["status"] != "ok" or base is None or base["status"] != "ok":
            continue
        s = {f"{k}_speedup": base[f"{k}_ms"] / r[f"{k}_ms"] for k in ("block_linears", "block")}
        if "forward_s" in r and "forward_s" in base:
            s.update(forward_speedup=base["forward_s"] / r["forward_s"], forward_s=r["forward_s"],
                     forward_s_unquantised=base["forward_s"])
        s.update({k: r[k] for k in ("cosine", "rel_l2") if k in r})
        s.update(peak_mem_gib=r.get("peak_mem_gib"), peak_mem_gib_unquantised=base.get("peak_mem_gib"))
        out[r["label"]] = s
    return out


def summarize(results: dict[str, dict], diff: dict | None) -> dict:
    """Fastest forward, each forward over the reference's (:func:`forward_reference`), Diffusers' speed-ups,
    and the quantised records against the unquantised ones (:func:`quant_summary`)."""
    ok = [r for r in results.values() if r["status"] == "ok" and "forward_s" in r]
    if not ok:
        return {}
    best = min(ok, key=lambda r: r["forward_s"])
    ref = forward_reference(ok)
    summary = {"fastest_kernel": best["kernel"], "fastest_label": best["label"], "fastest_forward_s": best["forward_s"],
               "forward_reference": ref["label"],
               "forward_vs_reference": {r["label"]: r["forward_s"] / ref["forward_s"] for r in ok}}
    if diff and diff.get("forward_s"):
        summary["diffusers_forward_s"] = diff["forward_s"]
        summary["speedup_vs_diffusers"] = {r["label"]: diff["forward_s"] / r["forward_s"] for r in ok}
    quant = quant_summary(results)
    if quant:
        summary["quant"] = quant
    return summary


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
    if "cosine" in r:
        parts.append(f"cos {r['cosine']:.5f} rel L2 {r['rel_l2']:.2e}")
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
    quants = parse_quant(args.quant)
    schemes = [q for q in quants if q != "none"]
    if schemes and args.diffusers:
        raise UserError("--diffusers runs on the unquantised weights; run it without a --quant scheme")
    device = _device(args)
    dtype = DTYPES[args.dtype]
    gemm, gemm_note = None, None  # torchao's float8 GEMM; torch._scaled_mm directly (recorded) where it fails to import
    if schemes:
        from ..models.quant import check_quant_runtime, scaled_mm_gemm, torchao_gemm

        if device.type == "cuda":
            check_quant_runtime(device, dtype, need_torchao=False)  # before the model is built (ConfigError)
        try:
            torchao_gemm()
        except UserError as e:
            gemm, gemm_note = scaled_mm_gemm, f"torchao unusable here, torch._scaled_mm called directly: {e}"
            print(f"[bench dit] {gemm_note}", flush=True)
    cfg = model_config(args)
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    frames, height, width = (v if v is not None else d for v, d in zip((args.frames, args.height, args.width), shape))
    lat = latent_shape(frames, height, width)
    tokens = math.prod(n // p for n, p in zip(lat, cfg.patch_size))

    runs, unavailable, cross = plan_runs(args, device, dtype, cfg)
    keys = [r.kernel for r in runs if r.attn_type is None]

    env = environment()
    env["device"] = str(device)
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    out_path = Path(args.out or f"benchmarks/results/dit_{card_slug(env['card'])}.json")
    print(f"[bench dit] {args.model}{' (tiny)' if args.tiny else ''}: dim {cfg.dim}, {cfg.num_heads} heads, "
          f"{cfg.num_layers} layers, FFN {cfg.ffn_dim}; video {frames}x{height}x{width} -> latent {list(lat)} -> "
          f"{tokens:,} tokens; {args.dtype} on {env['card']}; fused ops: {fused_mode() if device.type == 'cuda' else 'eager'}",
          flush=True)
    for r in runs:
        if r.attn_type is not None:
            print(f"[bench dit] {r.label}: self-attention {r.attn_type} -> {r.description} [{r.kernel}]"
                  f"{' (FALLBACK)' if r.resolution['fallback'] else ''}; cross-attention {cross[0]}", flush=True)

    _reset_peak(device)
    sites = (SELF_SITE, TEXT_SITE, IMAGE_SITE) if cfg.has_image_branch else (SELF_SITE, TEXT_SITE)
    model = build_dit(cfg, device=device, dtype=dtype, attention=None, seed=args.seed, std=0.02)  # torch_sdpa until a run sets its own
    # as the engine: the run's radial setting goes into every kernel's policy (bind_self_attention; used only by a
    # radial kernel), and the step index of each forward is set; dense_timesteps 0 makes step 0 a radial step
    radial = RadialAttnSetting(decay_factor=args.radial_decay, block_size=args.radial_block_size,
                               dense_timesteps=0, dense_layers=0)
    model.set_step(radial.dense_timesteps)
    weights_gib = _weight_gib(model)
    inputs = make_inputs(cfg, lat, device, dtype, args.seed)

    payload_head = {
        "suite": "dit",
        "environment": env,
        "config": {
            "model": args.model, "tiny": args.tiny, "model_config": dataclasses.asdict(cfg),
            "video": {"frames": frames, "height": height, "width": width}, "latent": [1, 16, *lat], "tokens": tokens,
            "dtype": args.dtype, "device": str(device), "weights": "random N(0, 0.02), built on the device",
            "weights_gib": weights_gib, "fused_ops": fused_mode() if device.type == "cuda" else "eager",
            "kernels": keys, "attn_types": [r.attn_type for r in runs if r.attn_type is not None],
            "quant": quants, "quant_gemm_note": gemm_note,
            "quant_note": ("fp8 rows: the declared linears quantised in place after the unquantised rows (weights "
                           "from the same random bf16 values); CPU: torch._scaled_mm's CPU kernel") if schemes else None,
            "sites": ("--kernels: every attention site runs the kernel under test; --attn-types: the type at "
                      "self_attn_1_type (resolved by the registry), cross-attention on cross_kernel"),
            "cross_kernel": cross[0] if cross else None, "cross_kernel_why": cross[1] if cross else None,
            "radial_attn_setting": dataclasses.asdict(radial), "radial_step": radial.dense_timesteps,
            "sparge_topk": args.sparge_topk if any(r.attn_type == "sparge" or r.kernel.startswith("sparge")
                                                   for r in runs) else None,
            "warmup": args.warmup, "iters": args.iters, "block_warmup": args.block_warmup, "block_iters": args.block_iters,
            "seed": args.seed,
            "timing": "CUDA events, median; block = WanBlock.forward on block 0 with the forward's inputs",
            "peak_mem_gib": "torch.cuda.max_memory_allocated during the timed calls, weights included",
        },
        "unavailable": unavailable,
    }
    results: dict[str, dict] = {}
    reference: tuple[str, torch.Tensor] | None = None  # (kernel, our output) to compare Diffusers with
    outputs: dict[str, torch.Tensor] = {}  # unquantised output per configuration, for the quantised rows
    compare = "none" in quants and bool(schemes) and not args.skip_forward
    for quant in quants:
        if quant != "none":
            from ..models.quant import quantize_model_

            try:
                payload_head["quant_report"] = quantize_model_(model, quant, check_device=False, gemm=gemm)
            except UserError as e:
                print(f"[bench dit] --quant {quant}: refused ({e})", flush=True)
                results[quant] = {"label": quant, "quant": quant, "status": "error", "error": str(e)}
                break
            payload_head["config"]["weights_gib_quantised"] = _weight_gib(model)
            print(f"[bench dit] {quant}: {payload_head['quant_report']['linears']} linears quantised "
                  f"({', '.join(payload_head['quant_report']['modules'])}); weights "
                  f"{payload_head['config']['weights_gib_quantised']:.1f} GiB", flush=True)
        for run in runs:
            label = run.label if quant == "none" else f"{run.label}+{quant}"
            rec: dict = {"label": label, "kernel": run.kernel, "description": run.description,
                         "attn_type": run.attn_type, "quant": None if quant == "none" else quant,
                         "base_label": None if quant == "none" else run.label}
            if run.resolution is not None:
                rec.update(resolution=run.resolution, fallback=run.resolution["fallback"])
            try:
                attention = run.attention(sites)
                rec["site_kernels"] = {s: b.key for s, b in attention.items()}
                model.set_attention(attention)
                rec.update(bind_self_attention(model, args, radial))
                kept: dict | None = {} if compare else None
                rec.update(bench_ours(model, inputs, args, device, keep_output=kept))
                rec["status"] = "ok"
                if kept and quant == "none":
                    outputs[run.label] = kept["out"].float()
                elif kept and run.label in outputs:
                    out, ref = kept["out"].float(), outputs[run.label]
                    rec["cosine"] = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
                    rec["rel_l2"] = rel_l2(out, ref)
                del kept
                if (args.diffusers and not args.skip_forward and run.attn_type in EXACT_TYPES
                        and (reference is None or run.kernel == "sdpa_cudnn")):
                    with torch.inference_mode():
                        reference = (run.kernel, model(**inputs).float())
            except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the others
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            results[label] = rec
            print("[bench dit] " + _fmt_row(f"ditfleet/{label}", rec), flush=True)
            # what ran so far, in case the process is stopped (a device time limit); "complete" stays false
            write_json(out_path, {**payload_head, "results": list(results.values()), "diffusers": None,
                                  "summary": summarize(results, None), "complete": False})
            _reset_peak(device)
    del outputs

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

    summary = summarize(results, diff)
    write_json(out_path, {**payload_head, "results": list(results.values()), "diffusers": diff, "summary": summary,
                          "complete": True})
    for label, q in (summary.get("quant") or {}).items():
        print(f"[bench dit] {label} vs unquantised: linears {q['block_linears_speedup']:.2f}x, block "
              f"{q['block_speedup']:.2f}x" + (f", forward {q['forward_speedup']:.2f}x ({q['forward_s']:.3f} s)"
                                               if "forward_speedup" in q else "")
              + (f", cos {q['cosine']:.5f}, rel L2 {q['rel_l2']:.2e}" if "cosine" in q else "")
              + (f", peak {q['peak_mem_gib']:.1f} vs {q['peak_mem_gib_unquantised']:.1f} GiB"
                 if q.get("peak_mem_gib") is not None and q.get("peak_mem_gib_unquantised") is not None else ""))
    if summary:
        print(f"[bench dit] forward time / {summary['forward_reference']}'s: " +
              ", ".join(f"{k} {v:.3f}x" for k, v in summary["forward_vs_reference"].items()))
        line = f"[bench dit] fastest: {summary['fastest_label']} {summary['fastest_forward_s']:.3f} s per forward"
        if "diffusers_forward_s" in summary:
            line += f" (diffusers {summary['diffusers_forward_s']:.3f} s)"
        print(line)
    print(f"[bench dit] wrote {out_path}")
    return 0 if any(r["status"] == "ok" for r in results.values()) else 1
