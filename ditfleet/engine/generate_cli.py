"""``ditfleet generate``: text/image -> video from a config, one request or a jobs file.

``ditfleet.cli`` adds the config arguments and this module's :func:`add_arguments`, and calls
:func:`main`; :func:`run` is the same command from Python (``generate_cli.run([...])``).

Launchers (``--launcher`` or the config's ``launcher``): ``local`` (this process), ``torchrun``
(``torchrun --nproc-per-node N -m ditfleet generate ...``; chosen by itself when started by
torchrun with more than one process), ``ray`` (worker actors; ``ray.*`` config keys). Exit
status: 0 done, 1 some jobs failed or the workers failed (one line, no traceback), 2 user error,
130 interrupted (workers and Ray resources released first).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


log = logging.getLogger("ditfleet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``generate``'s own options (the config arguments come from ``ditfleet.cli``)."""
    p.add_argument("--prompt", help="text prompt (default: the config's prompt, else the official Wan example)")
    p.add_argument("--negative-prompt", dest="negative_prompt",
                   help="negative prompt for classifier-free guidance (default: the official Wan2.1 one)")
    p.add_argument("--image", help="I2V reference image (task i2v)")
    p.add_argument("-o", "--output", help="output: .mp4 (16 fps H.264), .npy (uint8 [F, H, W, 3]) or a folder "
                                          "(PNG frames); a <name>.json report is written beside it "
                                          "(default: outputs/ditfleet-<task>-<time>-seed<seed>.mp4)")
    p.add_argument("--jobs", metavar="JOBS.jsonl",
                   help="run many requests with the model loaded once: one JSON object per line with prompt "
                        "and optionally negative_prompt, image, seed, frames, size (\"832x480\"), output")
    p.add_argument("--launcher", choices=("local", "torchrun", "ray"),
                   help="how the ranks run: local (one process), torchrun (under torchrun, one process per GPU) or "
                        "ray (worker actors in a placement group); default: the config's launcher, or torchrun "
                        "when started by torchrun with several processes")
    p.add_argument("--save-latents", dest="save_latents", metavar="FILE.pt",
                   help="also save the final latents (float32 [1, 16, F', H/8, W/8], torch.save) -- parity checks "
                        "across launchers")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no info messages")


def _load_config(args):
    from ..config import load_config_or_default
    from .torchrun import torchrun_env

    path = getattr(args, "config_opt", None) or getattr(args, "config", None)
    overrides = list(getattr(args, "overrides", None) or [])
    trun = torchrun_env()
    launcher = getattr(args, "launcher", None)
    if launcher is None and trun is not None and trun["world_size"] > 1:
        launcher = "torchrun"  # `torchrun --nproc-per-node N -m ditfleet generate -c CONFIG`
    if launcher is not None:
        overrides.append(f"launcher={launcher}")
    world = trun["world_size"] if trun is not None and launcher == "torchrun" else None
    return load_config_or_default(path, overrides, world_size=world)


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the workers are shut down on the way out."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def main(args) -> int:
    """Run ``generate``. Returns 0 on success, 1 when some jobs failed or the workers failed; user errors raise UserError."""
    from .executor import EngineError

    logger = logging.getLogger("ditfleet")
    level = logger.level
    if args.quiet:
        logger.setLevel(logging.WARNING)
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        return _main(args)
    except EngineError as e:
        print(f"ditfleet: error: {e}", file=sys.stderr)
        return 1
    except _Terminated:
        print("ditfleet: terminated", file=sys.stderr)
        return 143
    finally:
        logger.setLevel(level)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _main(args) -> int:
    from .engine import Engine
    from .jobs import parse_jobs, run_jobs
    from .pipeline import load_image, request_from_config
    from .torchrun import torchrun_env
    from .video import check_output

    cfg, source = _load_config(args)
    trun = torchrun_env()
    driver = cfg.launcher != "torchrun" or trun is None or trun["rank"] == 0
    if not driver:  # torchrun ranks > 0: rank 0 reports
        logging.getLogger("ditfleet").setLevel(logging.ERROR)
    base = request_from_config(cfg, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
                               output=args.output)
    if args.jobs:
        jobs = parse_jobs(args.jobs, base)  # fail fast on an unreadable file, before loading the model
        with Engine.start(cfg) as engine:
            summary = run_jobs(engine, jobs, path=args.jobs, quiet=args.quiet)
        if driver:
            print(summary.format())
        return 0 if summary.failed == 0 else 1
    # check the request before the (slow) model load
    base.validate(cfg.task)
    if driver:
        check_output(base.output)
        if cfg.task == "i2v":
            load_image(base.image)
    log.info("config: %s; task %s, %d frames %dx%d, %d steps, %s, launcher %s (%d rank(s))", source, cfg.task,
             base.frames, base.width, base.height, base.steps, cfg.dtype, cfg.launcher, cfg.parallel.world_size)
    with Engine.start(cfg) as engine:
        result = engine.generate(base, quiet=args.quiet)
    if driver:
        if args.save_latents:
            import torch

            os.makedirs(os.path.dirname(os.path.abspath(args.save_latents)), exist_ok=True)
            torch.save(result.latents, args.save_latents)
        print(f"wrote {result.output} ({result.frames} frames, {base.width}x{base.height}) and {result.report_path}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``ditfleet generate ARGS`` (also ``python -m ditfleet.engine.generate_cli ARGS``): the CLI's parser and error handling."""
    from ..cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
