"""The torchrun launcher: ``torchrun --nproc-per-node N -m ditfleet generate -c CONFIG``.

Every torchrun process runs the same engine code (SPMD) with its own :class:`~.worker.Worker`;
the device is ``cuda:LOCAL_RANK`` (or the CPU with gloo). Rank 0 is the driver: it alone reads
the sparge checkpoint and the I2V image, encodes, decodes and writes the output; what the other
ranks need from it (sparge thresholds, the encoded request, a user error) comes by
``torch.distributed`` broadcast. A rank that dies takes the others down through torchrun's agent
(and the process group's timeout bounds any wait).
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError
from .executor import Executor, drain, timed

#: Collective timeout under torchrun: ranks > 0 wait in a broadcast while rank 0 decodes and writes
#: the previous video, so it must exceed the longest decode.
PROCESS_GROUP_TIMEOUT_S = 1800.0


def torchrun_env() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` when this process was started by torchrun, else ``None``."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ["LOCAL_RANK"])}
    except (KeyError, ValueError):
        return None


class TorchrunExecutor(Executor):
    """This process's worker, in a world that torchrun started (SPMD: one engine per process)."""

    launcher = "torchrun"
    spmd = True

    def __init__(self, cfg):
        super().__init__(cfg)
        env = torchrun_env()
        if env is None:
            raise ConfigError("launcher", "'torchrun' needs the processes torchrun starts: run "
                                          f"torchrun --nproc-per-node {self.world_size} -m ditfleet generate ...")
        if env["world_size"] != self.world_size:
            raise ConfigError("parallel", f"the parallel degrees need {self.world_size} processes, but torchrun "
                                          f"started {env['world_size']} (WORLD_SIZE); make them equal")
        self.rank, self.local_rank = env["rank"], env["local_rank"]
        from .worker import Worker

        self.worker = Worker(cfg)

    def start(self, attention_state: dict | None) -> dict[str, float]:
        stages: dict[str, float] = {}
        with timed(stages, "device"):
            self.collective_rpc("init_device", rank=self.rank, world_size=self.world_size, local_rank=self.local_rank)
        with timed(stages, "process_group"):
            self.collective_rpc("init_process_group", timeout_s=PROCESS_GROUP_TIMEOUT_S)
        with timed(stages, "sparge"):
            attention_state = self.share(attention_state if self.is_driver else None)
        with timed(stages, "load"):
            self.collective_rpc("load_model", attention_state)
        self.infos = self._gather(self.worker.report())
        self.alive = True
        return stages

    def _gather(self, value) -> list:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def share(self, value):
        """Rank 0's ``value`` on every rank (``torch.distributed.broadcast_object_list``; tensors move via pickling on the CPU)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        device = self.worker.device if self.worker.backend == "nccl" else None
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def shutdown(self, graceful: bool = True) -> None:
        self.worker.shutdown(sync=graceful and self.alive, timeout_s=PROCESS_GROUP_TIMEOUT_S)
        self.alive = False

    def _rpc(self, method, args, kwargs, ranks, rank_kwargs, timeout) -> list:
        out = [None] * self.world_size
        if self.rank in ranks:
            kw = {**kwargs, **(rank_kwargs[self.rank] if rank_kwargs else {})}
            out[self.rank] = getattr(self.worker, method)(*args, **kw)
        return out

    def _stream(self, method, args, kwargs, ranks, on_event, idle_timeout) -> list:
        out = [None] * self.world_size
        if self.rank in ranks:
            out[self.rank] = drain(getattr(self.worker, method)(*args, **kwargs), self.rank, on_event)
        return out


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def launch_torchrun(args) -> int:
    """``ditfleet generate --nproc-per-node N ...``: torchrun's launcher (``--standalone``) in this process.

    The config is loaded and checked for a world of N first (a mismatch with the parallel degrees, or any
    other config error, ends here: one message, exit 2). Then torchrun's elastic agent starts the N
    processes, each running ``python -m ditfleet generate`` with the same arguments. Their exit decides
    this command's: a user error on a rank (exit 2; rank 0 printed the message) returns 2 without
    torchrun's failure report; a rank that failed otherwise returns 1 with one line naming it.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from ..cli import config_path
    from ..config import load_config_or_default

    n = args.nproc_per_node
    if n < 1:
        raise ConfigError("--nproc-per-node", f"must be >= 1, got {n}")
    if torchrun_env() is not None:
        raise ConfigError("--nproc-per-node", "this process was itself started by torchrun; give one or the other")
    load_config_or_default(config_path(args), [*args.overrides, "launcher=torchrun"], world_size=n)
    child = _strip_nproc(list(getattr(args, "argv", None) or ["generate"]))  # the same command line, minus N
    targs = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "-m", "ditfleet", *child])
    quiet = logging.getLogger("torch.distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        run(targs)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode == 2:
            return 2
        print(f"ditfleet: error: rank {rank} of {n} exited with status {first.exitcode}"
              f"{' (' + first.signal_name() + ')' if first.exitcode < 0 else ''}; the other ranks were stopped",
              file=sys.stderr)
        return 1
    except SignalException as e:
        print(f"ditfleet: stopped by {e.sigval.name}; every rank was stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        quiet.setLevel(level)
    return 0
