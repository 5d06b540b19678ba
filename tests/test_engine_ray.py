"""The Ray launcher on CPU: 2 worker actors (gloo) on a local cluster, shared by the module's tests.

* ``--launcher ray`` with ``seq_p_size: 2`` gives the latents of ``--launcher local`` (rel L2 <= 1e-4),
  through the Python API and the CLI;
* a sparge checkpoint (.pt and .safetensors) reaches both workers from the driver (the file is
  deleted as soon as the driver has read it; both workers report the driver's checksum);
* a worker killed (SIGKILL) mid-run: the request is retried on a rebuilt group, or fails with a
  clear error when retries are off, within 60 s; a stopped (hung) worker trips the idle timeout;
* no worker, placement group or Ray process is left behind (after ``shutdown()``, Ctrl-C, and at
  the end of the module: every process carrying this module's environment marker is gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("diffusers")

from ditfleet.defaults import TINY_DEFAULT  # noqa: E402
from ditfleet.engine import Engine, EngineError, generate_cli  # noqa: E402
from ditfleet.engine import engine as engine_mod  # noqa: E402
from ditfleet.engine.executor import LocalExecutor  # noqa: E402
from ditfleet.engine.ray_executor import RayExecutor, ray_init_kwargs  # noqa: E402
from ditfleet.engine.sparge_weights import make_sparge_weights, save_sparge_weights, sparge_checksum  # noqa: E402
from ditfleet.engine.tiny import TINY_SPEC, tiny_model_path  # noqa: E402
from ditfleet.engine.video import read_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
MARKER_VAR = "DITFLEET_TEST_MARKER"
LAYERS, HEADS = TINY_SPEC["dit"]["num_layers"], TINY_SPEC["dit"]["num_attention_heads"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def marked_pids(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``marker``: every process Ray started for us."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{d}/stat") as s:
                        if s.read().split(")")[-1].split()[0] != "Z":
                            out.append(int(d))
        except OSError:
            pass
    return out


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster (2 CPUs, dashboard off) for the module; at the end, nothing of it may remain."""
    old = {k: os.environ.get(k) for k in ("DITFLEET_CACHE", MARKER_VAR)}
    marker = uuid.uuid4().hex
    os.environ["DITFLEET_CACHE"] = str(tmp_path_factory.mktemp("ditfleet-cache"))
    os.environ[MARKER_VAR] = marker  # inherited by every Ray process started below
    tiny_model_path("t2v")  # built once here, before the workers look for it
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="WARNING")
    try:
        yield marker
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + 20
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_pids(marker) == [], "Ray processes left after ray.shutdown()"


def config(**changes) -> dict:
    cfg = {**TINY_DEFAULT, "device": "cpu", "launcher": "ray", "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses"},
           "ray": {"request_timeout_s": 60, "init_timeout_s": 60, "max_retries": 1}}
    for k, v in changes.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


@pytest.fixture(scope="module")
def local(cluster):
    """The single-process reference engine (same tiny model, same cache)."""
    with Engine.start({**TINY_DEFAULT, "device": "cpu"}) as eng:
        yield eng


@pytest.fixture(scope="module")
def local_ref(local, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.npy"
    return local.generate(output=str(out), quiet=True)


@pytest.fixture
def sparge_files(tmp_path):
    state = make_sparge_weights(LAYERS, HEADS, seed=3)
    pt = save_sparge_weights(state, tmp_path / "sparge.pt")
    st = save_sparge_weights(state, tmp_path / "sparge.safetensors")
    return state, pt, st


# ---- parity and sparge broadcast ----------------------------------------------------------------------
def test_ray_matches_local_and_broadcasts_sparge(cluster, local_ref, sparge_files, tmp_path, monkeypatch):
    state, pt, _ = sparge_files
    real = engine_mod.load_for_run

    def load_then_delete(cfg):  # the workers cannot read the file: they must get the tensors from the driver
        out = real(cfg)
        os.remove(cfg.sparge_ckpt)
        return out

    monkeypatch.setattr(engine_mod, "load_for_run", load_then_delete)
    with Engine.start(config(sparge_ckpt=str(pt))) as eng:
        assert not pt.exists()
        want = sparge_checksum(state)
        assert eng.sparge_info["sha256"] == want and eng.sparge_info["layers"] == LAYERS
        workers = eng.workers
        assert [w["rank"] for w in workers] == [0, 1] and len({w["pid"] for w in workers}) == 2
        assert all(w["sparge_sha256"] == want and w["sparge_tensors"] == 5 * LAYERS for w in workers)
        assert all(w["backend"] == "gloo" and w["device"] == "cpu" for w in workers)
        res = eng.generate(output=str(tmp_path / "ray.npy"), quiet=True)
        assert rel_l2(res.latents, local_ref.latents) <= TOL
        assert np.abs(read_video(res.output).astype(int) - read_video(local_ref.output).astype(int)).max() <= 1
        rep = json.loads(res.report_path.read_text())
        assert rep["parallel"]["seq_p_size"] == 2 and rep["parallel"]["launcher"] == "ray"
        e = rep["engine"]
        assert e["launcher"] == "ray" and e["attempts"] == 1 and e["placement_strategy"] == "STRICT_PACK"
        assert {"ray_init", "placement_group", "ranks", "env", "device", "process_group", "load"} <= set(e["startup_s"])
        assert e["sparge"]["sha256"] == want and all(w["sparge_sha256"] == want for w in e["workers"])
        # the same workers serve the next request
        other = eng.generate(output=str(tmp_path / "ray7.npy"), seed=7, decode=False, quiet=True)
        assert not torch.equal(other.latents, res.latents)
        assert [w["pid"] for w in eng.workers] == [w["pid"] for w in workers]
        pids = [w["pid"] for w in workers]
    assert wait_gone(pids) == []
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_cli_ray_launcher_matches_local(cluster, local_ref, sparge_files, tmp_path):
    _, _, st = sparge_files
    out, lat = tmp_path / "cli.npy", tmp_path / "cli.pt"
    rc = generate_cli.run(["--launcher", "ray", "--set", "device=cpu", "--set", "parallel.seq_p_size=2",
                           "--set", f"sparge_ckpt={st}", "-o", str(out), "--save-latents", str(lat), "--quiet"])
    assert rc == 0
    assert rel_l2(torch.load(lat), local_ref.latents) <= TOL
    assert np.abs(read_video(out).astype(int) - read_video(local_ref.output).astype(int)).max() <= 1
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["engine"]["launcher"] == "ray" and len({w["sparge_sha256"] for w in rep["engine"]["workers"]}) == 1
    assert ray.is_initialized()  # the CLI joined the running cluster and left it running


# ---- faults -------------------------------------------------------------------------------------------------
def _killer(eng: Engine, rank: int, sig=signal.SIGKILL, at: int = 1):
    pid = eng.workers[rank]["pid"]
    fired: list[float] = []

    def progress(i: int, n: int) -> None:
        if i == at and not fired:
            fired.append(time.monotonic())
            os.kill(pid, sig)

    return pid, fired, progress


def test_killed_worker_is_retried_on_a_rebuilt_group(cluster, local, tmp_path):
    steps = 30  # ~20 ms a step here: the kill lands while the loop still runs
    ref = local.generate(output=str(tmp_path / "ref.npy"), steps=steps, decode=False, quiet=True)
    with Engine.start(config(infer_steps=steps)) as eng:
        old = [w["pid"] for w in eng.workers]
        victim, fired, progress = _killer(eng, rank=1)
        t0 = time.monotonic()
        res = eng.generate(output=str(tmp_path / "retried.npy"), progress=progress, quiet=True)
        assert fired and time.monotonic() - t0 < 60
        assert res.report["engine"]["attempts"] == 2 and eng.startups == 2
        assert rel_l2(res.latents, ref.latents) <= TOL
        new = [w["pid"] for w in eng.workers]
        assert not set(new) & set(old)
        assert wait_gone(old) == []  # the survivor of the broken group was killed too
    assert wait_gone(new) == []


def test_killed_worker_without_retries_fails_cleanly(cluster, tmp_path):
    with Engine.start(config(infer_steps=30, ray={"max_retries": 0})) as eng:
        pids = [w["pid"] for w in eng.workers]
        _, fired, progress = _killer(eng, rank=0)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"failed after 1 attempt.*rank 0 .*died"):
            eng.generate(output=str(tmp_path / "dead.npy"), progress=progress, quiet=True)
        assert fired and time.monotonic() - t0 < 60
        assert not eng.executor.alive
        assert wait_gone(pids) == []
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_hung_worker_trips_the_idle_timeout_then_retries(cluster, tmp_path):
    with Engine.start(config(infer_steps=30, ray={"request_timeout_s": 3})) as eng:
        old = [w["pid"] for w in eng.workers]
        _, fired, progress = _killer(eng, rank=1, sig=signal.SIGSTOP)  # alive but frozen
        t0 = time.monotonic()
        res = eng.generate(output=str(tmp_path / "hung.npy"), progress=progress, quiet=True)
        assert fired and time.monotonic() - t0 < 60 and res.report["engine"]["attempts"] == 2
        assert wait_gone(old) == []
        new = [w["pid"] for w in eng.workers]
    assert wait_gone(new) == []


def test_ctrl_c_shuts_everything_down(cluster, tmp_path):
    """A CLI run with its own local Ray cluster, interrupted mid-denoise as a terminal's Ctrl-C does."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER_VAR: marker, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ditfleet", "generate", "--launcher", "ray", "--set", "device=cpu",
           "--set", "parallel.seq_p_size=2", "--set", "infer_steps=100000", "-o", str(tmp_path / "int.npy")]
    # SIGINT back to its default before the CLI starts: a shell's background job (`cmd &`) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt, whatever the CLI does
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
    p = subprocess.Popen([sys.executable, "-c", reset, *cmd], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        for line in p.stderr:
            if "worker(s) ready" in line:
                break
        else:
            pytest.fail(f"the run ended before its workers were ready (exit {p.wait()})")
        time.sleep(1.0)
        assert len(marked_pids(marker)) >= 3  # driver, Ray's own processes, 2 workers
        os.killpg(p.pid, signal.SIGINT)
        t0 = time.monotonic()
        rest = p.communicate(timeout=60)[1]  # a run that ignores the interrupt fails here instead of hanging
        assert p.returncode == 130, rest
        assert time.monotonic() - t0 < 60 and "interrupted" in rest and "Traceback" not in rest
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    deadline = time.monotonic() + 20
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_pids(marker) == []
    assert not (tmp_path / "int.npy").exists()


# ---- small pieces ---------------------------------------------------------------------------------------------
def test_only_listed_worker_methods_can_be_called(cluster):
    from ditfleet.config import load_config

    for ex in (LocalExecutor(load_config(None, [], data={**TINY_DEFAULT, "device": "cpu"})),
               RayExecutor(load_config(None, [], data=config()))):
        for bad in ("__init__", "runner", "pipe", "_need_pipeline", "set_sparge_weights"):
            with pytest.raises(ValueError, match="not a worker method"):
                ex.collective_rpc(bad)
        with pytest.raises(ValueError, match="collective_stream"):
            ex.collective_rpc("execute", None)
        with pytest.raises(ValueError, match="collective_rpc"):
            ex.collective_stream("report")


def test_ray_init_keeps_the_dashboard_off_or_on_loopback(monkeypatch):
    from ditfleet.config import load_config

    def kw(**ray_cfg):
        return ray_init_kwargs(load_config(None, [], data=config(ray=ray_cfg)).ray, world_size=2)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    k = kw()
    assert k["address"] == "local" and k["include_dashboard"] is False and "dashboard_host" not in k
    assert k["num_cpus"] >= 2
    assert kw(dashboard=True)["dashboard_host"] == "127.0.0.1"
    assert kw(dashboard=True, dashboard_host="0.0.0.0")["dashboard_host"] == "0.0.0.0"
    joined = kw(address="10.0.0.1:6379")
    assert joined["address"] == "10.0.0.1:6379" and "include_dashboard" not in joined and "num_cpus" not in joined
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert kw()["address"] == "auto"


def test_cluster_too_small_is_a_config_error(cluster):
    from ditfleet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"parallel: 4 Ray worker\(s\) need 4 CPU"):
        Engine.start(config(parallel={"seq_p_size": 4}))
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_worker_errors_are_classified_retried_or_not():
    """A worker's own exception (out of memory, a CUDA error) is a WorkerError: not retried; a death, a hang or a
    peer's failure seen by a survivor (PeerError, DistBackendError) is a WorkerFailure: retried."""
    from ray import exceptions as rex

    from ditfleet.engine.executor import WorkerError, WorkerFailure
    from ditfleet.engine.ray_executor import RayExecutor
    from ditfleet.parallel import PeerError

    ex = RayExecutor.__new__(RayExecutor)
    ex.infos = [{"pid": 11, "node_ip": "10.0.0.1"}, {"pid": 12, "node_ip": "10.0.0.1"}]
    oom = ex._failure(rex.RayTaskError("execute", "tb", RuntimeError("CUDA out of memory")), 1, "execute")
    assert isinstance(oom, WorkerError) and "rank 1 (pid 12" in str(oom) and "not retried" in str(oom)
    peer = ex._failure(rex.RayTaskError("execute", "tb", PeerError("ring step 0: rank(s) 1 did not answer")), 0, "execute")
    assert isinstance(peer, WorkerFailure) and not isinstance(peer, WorkerError)
    assert isinstance(ex._failure(rex.GetTimeoutError("x"), 0, "execute"), WorkerFailure)


def test_a_worker_error_is_not_retried(monkeypatch, tmp_path):
    """Engine.generate: a WorkerError fails the request at once (attempt 1, counted), a WorkerFailure is retried."""
    from ditfleet.engine.executor import WorkerError

    eng = Engine.start(config(launcher="local", parallel={"seq_p_size": 1}))
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise WorkerError("rank 1 (pid 12) failed in execute: RuntimeError: CUDA out of memory (deterministic: not retried)")

    monkeypatch.setattr(eng, "_run", failing)
    monkeypatch.setattr(type(eng), "retries", property(lambda self: 2))
    with pytest.raises(WorkerError, match="not retried"):
        eng.generate(output=str(tmp_path / "x.npy"), quiet=True)
    assert calls == [1] and eng.deterministic_failures == 1 and eng.retried == 0
    eng.shutdown()



def _dying_pair(stall: bool = False):
    """An actor class (built here, so Ray ships it by value): rank 0 dies after a moment (``stall``: sleeps on,
    alive); rank 1, the survivor, fails at once with the PeerError its collective raises."""

    class DyingPair:
        def __init__(self, rank: int):
            self.rank = rank

        def _fail(self):
            from ditfleet.parallel import PeerError

            if self.rank == 0:
                time.sleep(60.0 if stall else 1.0)
                os._exit(1)
            raise PeerError("ulysses exchange: rank(s) 0 did not answer (connection reset by peer)")

        def report(self):
            self._fail()

        def execute(self):
            yield ("step", (0, 1))
            self._fail()

    return DyingPair


@pytest.mark.parametrize("method", ["report", "execute"])
def test_a_death_is_reported_before_the_survivors_peer_error(cluster, method):
    """Ray may hand over the survivor's PeerError before the dead rank's own error: the death is the failure named."""
    from ditfleet.config import load_config
    from ditfleet.engine.executor import WorkerFailure

    ex = RayExecutor(load_config(None, [], data=config()))
    ex.actors = [ray.remote(_dying_pair()).options(num_cpus=0, max_restarts=0).remote(r) for r in range(2)]
    ex.infos = [{"pid": None, "node_ip": "127.0.0.1"}] * 2
    try:
        with pytest.raises(WorkerFailure, match=r"^rank 0 died during .*; then rank 1 failed in .*PeerError"):
            if method == "report":
                ex._rpc(method, (), {}, [0, 1], None, 30)
            else:
                ex._stream(method, (), {}, [0, 1], None, 30)
    finally:
        for a in ex.actors:
            ray.kill(a, no_restart=True)


def test_a_stalled_peer_leaves_the_survivors_error_after_the_grace(cluster):
    """No death within PEER_DEATH_GRACE_S (a stalled peer): the survivor's PeerError is the failure, in bounded time."""
    from ditfleet.config import load_config
    from ditfleet.engine.executor import WorkerFailure
    from ditfleet.engine.ray_executor import PEER_DEATH_GRACE_S

    ex = RayExecutor(load_config(None, [], data=config()))
    ex.actors = [ray.remote(_dying_pair(stall=True)).options(num_cpus=0, max_restarts=0).remote(r) for r in range(2)]
    ex.infos = [{"pid": None, "node_ip": "127.0.0.1"}] * 2
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"^rank 1 failed in execute: PeerError"):
            ex._stream("execute", (), {}, [0, 1], None, 30)
        assert PEER_DEATH_GRACE_S - 0.5 <= time.monotonic() - t0 <= PEER_DEATH_GRACE_S + 5
    finally:
        for a in ex.actors:
            ray.kill(a, no_restart=True)
