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
import time
from pathlib import Path

from ..errors import UserError
from .errors import JobsFileError


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
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing outputs ditfleet did not write (an existing file, a non-empty PNG folder: "
                        "only its frame files NNNNN.png are replaced, its other files are kept)")
    p.add_argument("--nproc-per-node", dest="nproc_per_node", type=int, metavar="N",
                   help="start N worker processes on this machine through torchrun's launcher, supervised by this "
                        "command (same as torchrun --standalone --nproc-per-node N -m ditfleet generate ..., but the "
                        "config is checked first and a user error ends with one message and exit status 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no info messages")


def _load_config(args):
    from ..config import load_config_or_default
    from .torchrun import torchrun_env

    from ..cli import config_path

    path = config_path(args)
    overrides = list(getattr(args, "overrides", None) or [])
    trun = torchrun_env()
    launcher = getattr(args, "launcher", None)
    if launcher is None and trun is not None and trun["world_size"] > 1:
        launcher = "torchrun"  # `torchrun --nproc-per-node N -m ditfleet generate -c CONFIG`
    if launcher is not None:
        overrides.append(f"launcher={launcher}")
    world = trun["world_size"] if trun is not None and launcher == "torchrun" else None
    return load_config_or_default(path, overrides, world_size=world)


#: Seconds a torchrun rank > 0 waits before it reports a user error: rank 0 meets the same error (same config,
#: same files), prints it and exits first, and torchrun then stops this rank -- one message. A rank still running
#: after this wait had an error of its own, and says it with its rank.
PEER_GRACE_S = 5.0


def _after_peer_grace(e: UserError, trun) -> UserError:
    if trun is None or trun["rank"] == 0:
        return e
    time.sleep(PEER_GRACE_S)
    return UserError(f"rank {trun['rank']}: {e}")


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the workers are shut down on the way out."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def main(args) -> int:
    """Run ``generate``. Returns 0 on success, 1 when some jobs failed or the workers failed; user errors raise UserError."""
    from .executor import EngineError
    from .torchrun import torchrun_env

    if args.nproc_per_node is not None:
        from .torchrun import launch_torchrun

        return launch_torchrun(args)
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
        try:
            return _main(args)
        except UserError as e:
            raise _after_peer_grace(e, torchrun_env()) from None
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


def _save_latents(latents, path: str) -> None:
    """``torch.save`` through a temporary name and a rename (never a half-written file)."""
    import torch

    from .video import _remove

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        torch.save(latents, tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _main(args) -> int:
    from .engine import Engine
    from .jobs import check_jobs, parse_jobs, run_jobs
    from .pipeline import request_from_config
    from .preflight import preflight
    from .torchrun import torchrun_env
    from .video import check_file_output, check_output

    cfg, source = _load_config(args)
    trun = torchrun_env()
    driver = cfg.launcher != "torchrun" or trun is None or trun["rank"] == 0
    if not driver:  # torchrun ranks > 0: rank 0 reports
        logging.getLogger("ditfleet").setLevel(logging.ERROR)
    base = request_from_config(cfg, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
                               output=args.output, overwrite=args.overwrite or None)
    # every check before the (slow) model load: config, model folder, files, sizes, kernels, output paths
    if args.save_latents and driver:
        check_file_output(args.save_latents, "--save-latents", overwrite=args.overwrite)
    if args.jobs:
        jobs = parse_jobs(args.jobs, base)
        checked = preflight(cfg, None, files=driver)  # the model, sparge file, kernels; each job's fields next
        check_jobs(jobs, cfg, checked["geometry"], check_files=driver)
        if all(j.error for j in jobs):
            raise JobsFileError(f"jobs file {args.jobs!r}: no job can run:\n  " + "\n  ".join(j.error for j in jobs))
        with Engine.start(cfg) as engine:
            summary = run_jobs(engine, jobs, path=args.jobs, quiet=args.quiet)
        if driver:
            print(summary.format())
        return 0 if summary.failed == 0 else 1
    preflight(cfg, base, files=driver)
    if driver:
        check_output(base.output, overwrite=base.overwrite)
    log.info("config: %s; task %s, %d frames %dx%d (WxH), %d steps, %s, launcher %s (%d rank(s))", source, cfg.task,
             base.frames, base.width, base.height, base.steps, cfg.dtype, cfg.launcher, cfg.parallel.world_size)
    with Engine.start(cfg) as engine:
        result = engine.generate(base, quiet=args.quiet)
    if driver:
        if args.save_latents:
            _save_latents(result.latents, args.save_latents)
        print(f"wrote {result.output} ({result.frames} frames, {base.width}x{base.height}) and {result.report_path}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``ditfleet generate ARGS`` (also ``python -m ditfleet.engine.generate_cli ARGS``): the CLI's parser and error handling."""
    from ..cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
