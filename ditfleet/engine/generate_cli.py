"""``ditfleet generate``: text/image -> video from a config, one request or a jobs file.

Wiring (``ditfleet/cli.py``)::

    from .engine import generate_cli
    g = sub.add_parser("generate", help="generate videos (T2V / I2V) from a config")
    generate_cli.add_arguments(g)       # adds the config arguments too unless --set is already there
    g.set_defaults(func=generate_cli.main)

Also runnable alone: ``python -m ditfleet.engine.generate_cli [args]``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import UserError

log = logging.getLogger("ditfleet")


class _Parser(argparse.ArgumentParser):
    """argparse reporting bad command lines as a UserError (exit 2, one line), as ``ditfleet``'s own parser."""

    def error(self, message):  # noqa: D401
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``generate``'s options (and the config arguments, unless ``--set`` is already defined)."""
    if "--set" not in p._option_string_actions:
        p.add_argument("config", nargs="?", help="run config JSON (default: the embedded tiny config)")
        p.add_argument("-c", "--config", dest="config_opt", help="run config JSON (same as the positional argument)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key (dotted for nested keys, value as JSON), e.g. --set infer_steps=30",
        )
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no info messages")


def _load_config(args):
    from ..config import load_config
    from ..defaults import TINY_DEFAULT

    path = getattr(args, "config_opt", None) or getattr(args, "config", None)
    overrides = getattr(args, "overrides", None) or []
    if path is None:
        return load_config(None, overrides, data=TINY_DEFAULT), "embedded tiny default"
    return load_config(path, overrides), path


def main(args) -> int:
    """Run ``generate``. Returns 0 on success, 1 when some jobs of a jobs file failed; user errors raise UserError."""
    logger = logging.getLogger("ditfleet")
    level = logger.level
    if args.quiet:
        logger.setLevel(logging.WARNING)
    try:
        return _main(args)
    finally:
        logger.setLevel(level)


def _main(args) -> int:
    from .jobs import parse_jobs, run_jobs
    from .pipeline import Pipeline, load_image, request_from_config
    from .video import check_output

    cfg, source = _load_config(args)
    if cfg.launcher != "local":
        raise UserError(f"launcher: {cfg.launcher!r} is not available in this version of ditfleet generate; "
                        "set launcher to local (one process)")
    base = request_from_config(cfg, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
                               output=args.output)
    if args.jobs:
        jobs = parse_jobs(args.jobs, base)  # fail fast on an unreadable file, before loading the model
        pipe = Pipeline.from_config(cfg)
        summary = run_jobs(pipe, jobs, path=args.jobs, quiet=args.quiet)
        print(summary.format())
        return 0 if summary.failed == 0 else 1
    # check the request before the (slow) model load
    base.validate(cfg.task)
    check_output(base.output)
    if cfg.task == "i2v":
        load_image(base.image)
    log.info("config: %s; task %s, %d frames %dx%d, %d steps, %s on %s", source, cfg.task, base.frames, base.width,
             base.height, base.steps, cfg.dtype, cfg.torch_device())
    pipe = Pipeline.from_config(cfg)
    result = pipe.generate(base, quiet=args.quiet)
    print(f"wrote {result.output} ({result.frames} frames, {base.width}x{base.height}) and {result.report_path}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m ditfleet.engine.generate_cli``), with the CLI's error handling."""
    parser = _Parser(prog="ditfleet generate", description="Generate videos (T2V / I2V) from a run config.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        return main(args)
    except UserError as e:
        print(f"ditfleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditfleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
