"""The ``ditfleet`` command: generate | check-config | doctor | serve | bench | sparge-tune.

Every user error (bad config, missing file, bad option) prints one message and exits with
status 2, without a traceback; an internal bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import torch

from . import __version__
from .engine import generate_cli
from .errors import UserError

log = logging.getLogger("ditfleet")

BENCH_SUITES = {
    "attention": ("ditfleet.bench.attention", "per-kernel dense attention: ms, TFLOP/s, error vs fp32"),
    "sp-attention": ("ditfleet.bench.sp_attention", "sequence-parallel attention (run under torchrun), vs yunchang"),
    "radial": ("ditfleet.bench.radial", "radial attention vs cuDNN dense at Wan sizes (one GPU; --sp under torchrun)"),
    "sparge": ("ditfleet.bench.sparge", "sparge attention vs cuDNN dense at Wan sizes (one GPU; --sp under torchrun): sparsity, ms, error"),
    "dit": ("ditfleet.bench.dit", "Wan DiT block and full forward at 14B / 720p shapes, optionally vs diffusers"),
    "step": ("ditfleet.bench.step", "whole CFG denoising step (ModelRunner) on 1 GPU and every layout of N (torchrun / Ray), vs diffusers"),
}


#: What ``doctor`` lists: the packages ditfleet needs, and the optional ones with what they add.
DOCTOR_REQUIRED = {n: "" for n in ("torch", "numpy", "safetensors", "diffusers", "transformers", "tokenizers",
                                   "imageio", "imageio-ffmpeg", "pillow", "tqdm")}
DOCTOR_OPTIONAL = {
    "triton": "built-in sage_attn2 and Sparge predictor kernels: pip install triton",
    "flash-attn-4": "flash_attn4, FA4 fallback of flash_attn3, block-sparse radial/Sparge: pip install 'ditfleet[flash-attn4]'",
    "flash-attn": "flash_attn2 (FlashAttention-2): source build, see its project",
    "flash_attn_3": "flash_attn3 (FA3, Hopper): build flash-attention's hopper/ folder",
    "sageattention": "sage_attn2 (SageAttention 2): source build, see its project",
    "spas_sage_attn": "sparge with tuned checkpoints (SpargeAttn): source build",
    "torchao": "dit_quantized FP8 linears (torchao's float8 GEMM): pip install 'ditfleet[fp8]'",
    "ray": "launcher ray: pip install 'ditfleet[ray]'",
    "matplotlib": "benchmark plots: pip install 'ditfleet[bench]'",
    "yunchang": "sequence-parallel peer in bench sp-attention: pip install 'ditfleet[bench]'",
    "fastapi": "ditfleet serve (HTTP job API): pip install 'ditfleet[serve]'",
    "uvicorn": "ditfleet serve (HTTP server): pip install 'ditfleet[serve]'",
    "python-multipart": "ditfleet serve image uploads: pip install 'ditfleet[serve]'",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad command lines as a UserError (exit 2, one line)."""

    def error(self, message):  # noqa: D401
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run config JSON (default: the embedded tiny config)")
    p.add_argument("-c", "--config", dest="config_opt", help="run config JSON (same as the positional argument)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (dotted for nested keys, value as JSON), e.g. --set parallel.seq_p_size=2",
    )


def config_path(args) -> str | None:
    """The config file of the command line: the positional argument or ``-c``, never both."""
    pos, opt = getattr(args, "config", None), getattr(args, "config_opt", None)
    if pos is not None and opt is not None:
        raise UserError(f"two config files given ({pos!r} and -c {opt!r}); give one (overrides go in --set KEY=VALUE)")
    return opt if opt is not None else pos


def _load(args, world_size: int | None = None):
    from .config import load_config_or_default

    return load_config_or_default(config_path(args), args.overrides, world_size=world_size)


def cmd_check_config(args) -> int:
    """Run every check ``generate`` runs before loading (:func:`~ditfleet.engine.preflight.preflight`), then report.

    Nothing is printed as valid until every check has passed: the config, the model folder, the sparge
    checkpoint, the I2V image, the output path, the video size against the model and this machine, and the
    kernel of each attention site.
    """
    from .attention import format_table
    from .engine.preflight import GIB, preflight
    from .engine.video import check_output

    world = args.world_size
    if world is None and "WORLD_SIZE" in os.environ:  # launched by torchrun
        world = int(os.environ["WORLD_SIZE"])
    cfg, source = _load(args, world_size=world)
    device = torch.device(args.device) if args.device else cfg.torch_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine sees no CUDA GPU; check the config on the GPU machine, "
                        "or with --device cpu for what a CPU run would use")
    from .engine.pipeline import request_from_config

    result = preflight(cfg, request_from_config(cfg, image=args.image), device=device, require_model=True)
    if cfg.output is not None:
        check_output(cfg.output)
    par, geom, est = cfg.parallel, result["geometry"], result["estimate"]
    lines = [
        f"task {cfg.task}, {cfg.target_video_length} frames {cfg.target_width}x{cfg.target_height} (WxH), "
        f"{cfg.infer_steps} steps, dtype {cfg.dtype}, device {device}",
        f"model: {geom.source}; {est['tokens']} video tokens ({est['tokens_per_rank']} per rank), memory on rank 0 "
        f"at least ~{est['total'] / GIB:.1f} GiB",
        f"parallel: {par.world_size} process(es) = cfg {par.cfg_p_size} x ring {par.ring_degree} x "
        f"ulysses {par.ulysses_degree} ({par.seq_p_attn_type}), launcher {cfg.launcher}",
    ]
    if result["sparge"]:
        sp = result["sparge"]
        lines.append(f"sparge thresholds: {sp['path']} ({sp['layers']} blocks x {sp['heads']} heads, sha256 "
                     f"{sp['sha256'][:12]})")
    resolutions = result["attention"]
    used = [r for r in resolutions.values() if r is not None]
    lines.append("attention kernels on this machine:")
    lines.append("  " + format_table(used).replace("\n", "\n  "))
    lines += [f"  {site}: not used by task {cfg.task}" for site, r in resolutions.items() if r is None]
    if cfg.site_types()["self_attn_1_type"] == "radial_attn":
        from .models.wan.sites import radial_density, wan_video_tokens

        rs = cfg.radial_attn_setting
        density = radial_density(cfg.target_video_length, cfg.target_height, cfg.target_width, rs)
        frames, per_frame = wan_video_tokens(cfg.target_video_length, cfg.target_height, cfg.target_width)
        lines.append(
            f"radial mask: {frames} latent frames x {per_frame} tokens = {frames * per_frame} tokens, "
            f"density {density:.3f} (decay_factor {rs.decay_factor}, block {rs.block_size}); dense for the first "
            f"{rs.dense_timesteps} step(s) and {rs.dense_layers} layer(s)"
        )
    print("\n".join(lines))
    print(f"config: {source} -- valid")
    return 0


def cmd_doctor(args) -> int:
    from .attention import reference_attention
    from .attention.registry import dense_kernel_keys, kernel_class
    from .bench.common import package_versions

    import importlib.metadata as md

    print(f"ditfleet {__version__}, python {sys.version.split()[0]}")
    installed = package_versions()
    for title, names in (("required", DOCTOR_REQUIRED), ("optional", DOCTOR_OPTIONAL)):
        print(f"{title} packages:")
        for name, hint in names.items():
            try:
                ver = installed.get(name) or md.version(name)
            except md.PackageNotFoundError:
                ver = None
            print(f"  {name:22s} {ver or 'not installed'}{'' if ver or not hint else '  (' + hint + ')'}")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "CUDA: not available")
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    print(f"attention self-check on {device} / {str(dtype).removeprefix('torch.')} "
          f"(B=2, S_q=1001, S_k=512, H=6, D=64, kv_lens=[512, 300]) vs float64:")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 6, 64, generator=gen) for s in (1001, 512, 512))
    ref, ref_lse = reference_attention(q, k, v, kv_lens=[512, 300])
    failed = 0
    for key in dense_kernel_keys():
        cls = kernel_class(key)
        reasons = cls.unavailable_reasons(device, dtype)
        if reasons:
            print(f"  {key:16s} skipped: {'; '.join(reasons)}")
            continue
        backend = cls(device=device, dtype=dtype)
        out, lse = backend(
            q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), kv_lens=[512, 300], return_lse=cls.caps.lse
        )
        err = float((out.double().cpu() - ref).norm() / ref.norm())
        lse_err = float((lse.double().cpu() - ref_lse).abs().max()) if lse is not None else float("nan")
        limit = 6e-2 if key.startswith("sage") else tol
        ok = err <= limit and (lse is None or lse_err <= 1e-2)
        failed += not ok
        print(f"  {key:16s} {'ok  ' if ok else 'FAIL'} rel L2 {err:.2e} (limit {limit:.0e}), LSE max err {lse_err:.1e}  {cls.description}")
    print("self-check passed" if not failed else f"self-check: {failed} kernel(s) FAILED")
    return 1 if failed else 0


def cmd_serve(args) -> int:
    return importlib.import_module("ditfleet.serve").main(args)


def cmd_sparge_tune(args) -> int:
    if getattr(args, "unavailable", None):
        raise UserError(args.unavailable)
    return importlib.import_module("ditfleet.sparge_tune").main(args)


def cmd_bench(args) -> int:
    if getattr(args, "unavailable", None):
        raise UserError(args.unavailable)
    return importlib.import_module(BENCH_SUITES[args.suite][0]).main(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ditfleet", description="Distributed inference for video diffusion transformers (Wan2.1).")
    p.add_argument("--version", action="version", version=f"ditfleet {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate videos (T2V / I2V) from a config; no arguments: the embedded tiny default")
    _add_config_args(g)
    generate_cli.add_arguments(g)
    g.set_defaults(func=generate_cli.main)

    c = sub.add_parser("check-config", help="validate a config and show which kernel each attention site runs here")
    _add_config_args(c)
    c.add_argument("--world-size", type=int, help="processes the run will have (default: torchrun's WORLD_SIZE, else the config's)")
    c.add_argument("--device", choices=["cpu", "cuda"], help="resolve kernels for this device (default: the config's)")
    c.add_argument("--image", help="I2V reference image the run will use (checked like generate --image)")
    c.set_defaults(func=cmd_check_config)

    d = sub.add_parser("doctor", help="show the environment and self-check every attention kernel that can run here")
    d.add_argument("--device", choices=["cpu", "cuda"])
    d.set_defaults(func=cmd_doctor)

    v = sub.add_parser("serve", help="serve one loaded engine over HTTP: a job API with a durable queue (needs ditfleet[serve])")
    _add_config_args(v)
    importlib.import_module("ditfleet.serve").add_arguments(v)
    v.set_defaults(func=cmd_serve)

    t = sub.add_parser("sparge-tune", help="tune a Sparge checkpoint (per-head thresholds) against dense attention")
    try:
        importlib.import_module("ditfleet.sparge_tune").add_arguments(t)
    except ImportError as e:
        t.set_defaults(unavailable=f"sparge-tune cannot run here: {e}")
    t.set_defaults(func=cmd_sparge_tune)

    b = sub.add_parser("bench", help="benchmark suites (results as JSON under benchmarks/results/)")
    suites = b.add_subparsers(dest="suite", required=True, parser_class=_Parser)
    for name, (module, help_text) in BENCH_SUITES.items():
        s = suites.add_parser(name, help=help_text)
        try:
            importlib.import_module(module).add_arguments(s)
        except ImportError as e:  # keep the other commands usable; say why this suite is not
            s.set_defaults(unavailable=f"bench {name} cannot run here: {e}")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv if argv is not None else sys.argv[1:])  # a launcher re-runs the command line
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"ditfleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditfleet: interrupted", file=sys.stderr)
        return 130


#: Exit statuses of a run stopped by a signal (SIGINT 130, SIGTERM 143).
SIGNAL_EXITS = (130, 143)


def entry() -> None:
    code = main()
    if code in SIGNAL_EXITS:
        # Stopped by a signal: the outputs are already cleaned up and the workers shut down (in main). Leave now
        # instead of through the interpreter's finalisation, which with torch loaded takes over a second (several
        # on a loaded machine) -- a stop should be prompt.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
