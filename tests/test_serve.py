"""``ditfleet serve``: a real server (a ``python -m ditfleet serve`` subprocess on 127.0.0.1) driven with httpx.

The tiny default model on the CPU, videos of 5-9 frames at 64x64 and a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from ditfleet.engine.video import read_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {"frames": 5, "size": "64x64", "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ditfleet serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir, self.args = data_dir, args
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 120.0) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ditfleet", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                 *self.args], cwd=str(self.data_dir.parent), env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, headers=AUTH) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def submit(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def wait_for(c: httpx.Client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120.0,
              until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/videos/{job_id}").json()
        if job["state"] in states and (until is None or until(job)):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} not in {states} after {timeout} s: {job}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve") / "data"
    data.mkdir()
    srv = Server(data, "--token", TOKEN, "--max-body-mb", "1").start()
    yield srv
    srv.stop()


def test_three_jobs_done_and_served(server, tmp_path):
    with server.client() as c:
        jobs = [submit(c, prompt=f"job {i}", seed=i, **{**SMALL, "frames": n}) for i, n in enumerate((5, 9, 5))]
        for job, n in zip(jobs, (5, 9, 5)):
            assert job["state"] in ("queued", "running")
            done = wait_for(c, job["id"])
            assert done["state"] == "done", done
            assert done["progress"]["step"] == done["progress"]["steps"] == 2
            r = c.get(done["content_url"])
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            out = tmp_path / f"{job['id']}.mp4"
            out.write_bytes(r.content)
            frames = read_video(out)
            assert frames.shape == (n, 64, 64, 3)
            rep = c.get(done["report_url"]).json()
            assert rep["frames"] == n and rep["seed"] == job["request"]["seed"]
        listed = [j["id"] for j in c.get("/v1/videos").json()["data"]]
        assert all(j["id"] in listed for j in jobs)
        metrics = c.get("/metrics").text
        assert "ditfleet_queue_depth 0" in metrics and "ditfleet_engine_retries_total 0" in metrics
        done_total = [ln for ln in metrics.splitlines() if ln.startswith("ditfleet_jobs_done_total")][0]
        assert float(done_total.split()[-1]) >= 3


def test_cancel_running_job(server):
    with server.client() as c:
        job = submit(c, prompt="long", frames=9, size="64x64", steps=200)
        queued = submit(c, prompt="after", **SMALL)
        running = wait_for(c, job["id"], states=("running",), until=lambda j: j["progress"]["step"] >= 1)
        assert "eta_s" in running
        r = c.delete(f"/v1/videos/{job['id']}")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        cancelled = wait_for(c, job["id"])
        assert cancelled["state"] == "cancelled"
        assert cancelled["progress"]["step"] < 200
        r = c.get(f"/v1/videos/{job['id']}/content")
        assert r.status_code == 409 and r.json()["error"]["field"] == "id"
        assert not list((server.data_dir / "outputs").glob(f"{job['id']}*"))  # nothing written, nothing half-written
        assert c.delete(f"/v1/videos/{job['id']}").status_code == 409  # already cancelled
        assert wait_for(c, queued["id"])["state"] == "done"  # the queue goes on


def test_cancel_queued_job(server):
    with server.client() as c:
        first = submit(c, prompt="first", frames=9, size="64x64", steps=30)
        second = submit(c, prompt="second", **SMALL)
        r = c.delete(f"/v1/videos/{second['id']}")
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
        assert wait_for(c, first["id"])["state"] == "done"
        assert c.get(f"/v1/videos/{second['id']}").json()["state"] == "cancelled"


def test_ten_concurrent_submissions_served_in_order(server):
    results: list = [None] * 10

    def post(i: int) -> None:
        with server.client() as c:
            results[i] = c.post("/v1/videos", json={"prompt": f"concurrent {i}", "seed": i, "frames": 5,
                                                    "size": "64x64", "steps": 1})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.status_code == 202 for r in results), [r.text for r in results if r is not None]
    with server.client() as c:
        jobs = [wait_for(c, r.json()["id"]) for r in results]
    assert all(j["state"] == "done" for j in jobs)
    by_arrival = sorted(jobs, key=lambda j: j["created_at"])
    started = [j["started_at"] for j in by_arrival]
    finished = [j["finished_at"] for j in by_arrival]
    assert started == sorted(started) and finished == sorted(finished)  # first accepted, first served
    assert all(f <= s for f, s in zip(finished, started[1:]))  # one at a time


BAD = [
    # (what, kwargs of httpx.post, status, field)
    ("missing prompt", {"json": {"frames": 5}}, 400, "prompt"),
    ("prompt not a string", {"json": {"prompt": 3}}, 400, "prompt"),
    ("empty prompt", {"json": {"prompt": "  "}}, 400, "prompt"),
    ("frames not 4n+1", {"json": {"prompt": "x", "frames": 6}}, 400, "frames"),
    ("height not a multiple of 16", {"json": {"prompt": "x", "height": 70}}, 400, "height"),
    ("size malformed", {"json": {"prompt": "x", "size": "big"}}, 400, "size"),
    ("steps zero", {"json": {"prompt": "x", "steps": 0}}, 400, "steps"),
    ("seed negative", {"json": {"prompt": "x", "seed": -1}}, 400, "seed"),
    ("solver unknown", {"json": {"prompt": "x", "solver": "ddim"}}, 400, "solver"),
    ("unknown key", {"json": {"prompt": "x", "frmes": 5}}, 400, "frmes"),
    ("unknown attention type", {"json": {"prompt": "x", "self_attn_1_type": "fastest_attn"}}, 400, "self_attn_1_type"),
    ("radial on a cross site", {"json": {"prompt": "x", "cross_attn_1_type": "radial_attn"}}, 400, "cross_attn_1_type"),
    ("attention needing a reload", {"json": {"prompt": "x", "self_attn_1_type": "radial_attn"}}, 400, "self_attn_1_type"),
    ("image on a t2v server", {"json": {"prompt": "x", "image": "/etc/hostname"}}, 400, "image"),
    ("image not an image (upload)", {"data": {"request": json.dumps({"prompt": "x"})},
                                     "files": {"image": ("cat.png", b"this is not a png", "image/png")}}, 400, "image"),
    ("multipart without request", {"data": {"prompt": "x"}, "files": {"note": ("a.txt", b"x", "text/plain")}}, 400,
     "request"),
    ("body not JSON", {"content": b"{prompt:", "headers": {**AUTH, "content-type": "application/json"}}, 400, "body"),
    ("body not an object", {"json": ["x"]}, 400, "body"),
    ("oversized body", {"json": {"prompt": "x" * (2 << 20)}}, 413, "body"),
    ("content type", {"content": b"prompt=x", "headers": {**AUTH, "content-type": "text/plain"}}, 415, "content-type"),
    ("bad token", {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer nope"}}, 401, "authorization"),
    ("no token", {"json": {"prompt": "x"}, "headers": {}}, 401, "authorization"),
]


@pytest.mark.parametrize("what,kwargs,status,field", BAD, ids=[b[0] for b in BAD])
def test_bad_submission(server, what, kwargs, status, field):
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", AUTH)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/videos", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert field.split("-")[0] in err["message"], err  # the message names it too
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("method,path,status,field", [
    ("GET", "/v1/videos/vid_nope", 404, "id"),
    ("GET", "/v1/videos/vid_nope/content", 404, "id"),
    ("GET", "/v1/videos/vid_nope/report", 404, "id"),
    ("DELETE", "/v1/videos/vid_nope", 404, "id"),
    ("GET", "/v1/nothing", 404, "path"),
    ("PUT", "/v1/videos", 405, "method"),
])
def test_bad_lookup(server, method, path, status, field):
    with server.client() as c:
        r = c.request(method, path)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_oversized_streamed_body(server):
    """A chunked body (no Content-Length) is counted as it arrives: 413, the server stays healthy."""

    def body():
        yield b'{"prompt": "'
        for _ in range(24):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(server.url + "/v1/videos", content=body(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_token_guards_every_route_but_healthz(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/videos").status_code == 401
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_sigkill_then_restart_keeps_every_job(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    srv = Server(data).start()
    try:
        with srv.client(headers={}) as c:
            first = submit(c, prompt="done before the kill", **SMALL)
            assert wait_for(c, first["id"])["state"] == "done"
            long = submit(c, prompt="running at the kill", frames=9, size="64x64", steps=60)
            rest = [submit(c, prompt=f"queued {i}", seed=i, **SMALL) for i in range(2)]
            wait_for(c, long["id"], states=("running",), until=lambda j: j["progress"]["step"] >= 2)
            srv.kill()
        assert not (data / "outputs" / f"{long['id']}.mp4").exists()
        srv = Server(data).start()
        with srv.client(headers={}) as c:
            after = {j["id"]: j for j in c.get("/v1/videos").json()["data"]}
            assert set(after) == {first["id"], long["id"], *(j["id"] for j in rest)}
            assert after[first["id"]]["state"] == "done"
            r = c.get(f"/v1/videos/{long['id']}/content")  # no partial file served while it re-runs
            assert r.status_code == 409 or after[long["id"]]["state"] == "done"
            for job, n in ((long, 9), *((j, 5) for j in rest)):
                done = wait_for(c, job["id"], timeout=180)
                assert done["state"] == "done", done
                out = tmp_path / f"{job['id']}.mp4"
                out.write_bytes(c.get(done["content_url"]).content)
                assert read_video(out).shape[0] == n
            assert c.get(f"/v1/videos/{long['id']}").json()["attempts"] == 2
            r = c.get(f"/v1/videos/{first['id']}/content")
            assert r.status_code == 200
    finally:
        srv.stop()


def test_non_loopback_host_needs_a_token(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ditfleet", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--token" in r.stderr and "Traceback" not in r.stderr


def test_ray_worker_killed_mid_job_is_retried_once(tmp_path):
    """``--launcher ray`` on CPU, 2 workers (Ulysses 2), I2V: SIGKILL of rank 1 during a job -> the engine rebuilds the
    group and re-runs the job once; it ends done, the retry is counted in /metrics, the server stays healthy. Then a
    deterministic failure at run time (the job's reference image gone by then) fails its job without a retry, counted."""
    pytest.importorskip("ray")
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    images = [tmp_path / f"ref{i}.png" for i in range(3)]
    for img in images:
        Image.new("RGB", (64, 64), (200, 40, 40)).save(img)
    srv = Server(data, "--launcher", "ray", "--set", "device=cpu", "--set", "task=i2v", "--set", "parallel.seq_p_size=2",
                 "--set", "ray.request_timeout_s=60", "--set", "ray.max_retries=1").start(timeout=240)
    try:
        with srv.client(headers={}) as c:
            health = c.get("/healthz").json()
            assert health["launcher"] == "ray" and len(health["workers"]) == 2
            victim = next(w["pid"] for w in health["workers"] if w["rank"] == 1)
            job = submit(c, prompt="killed under it", image=str(images[0]), frames=5, size="64x64", steps=40)
            wait_for(c, job["id"], states=("running",), until=lambda j: j["progress"]["step"] >= 2, timeout=180)
            os.kill(victim, signal.SIGKILL)
            done = wait_for(c, job["id"], timeout=240)
            assert done["state"] == "done", done
            metrics = c.get("/metrics").text
            assert "ditfleet_engine_retries_total 1" in metrics and "ditfleet_engine_startups_total 2" in metrics, metrics
            assert c.get("/healthz").status_code == 200
            out = tmp_path / "r.mp4"
            out.write_bytes(c.get(done["content_url"]).content)
            assert read_video(out).shape[0] == 5
            blocker = submit(c, prompt="keeps the queue busy", image=str(images[1]), frames=5, size="64x64", steps=20)
            doomed = submit(c, prompt="its image is gone when it runs", image=str(images[2]), **SMALL)
            wait_for(c, blocker["id"], states=("running",))
            images[2].unlink()
            assert wait_for(c, blocker["id"])["state"] == "done"
            failed = wait_for(c, doomed["id"])
            assert failed["state"] == "failed" and "does not exist" in failed["error"] and failed["attempts"] == 1, failed
            metrics = c.get("/metrics").text
            assert 'ditfleet_jobs_failed_total{kind="deterministic"} 1' in metrics, metrics
            assert "ditfleet_engine_retries_total 1" in metrics  # still the one retry of the killed worker
    finally:
        srv.stop()


def test_torchrun_ranks_serve_a_job(tmp_path):
    """``torchrun --nproc-per-node 2 -m ditfleet serve`` (Ulysses 2 on gloo): the launcher is picked from torchrun's
    environment, rank 0 serves HTTP, both ranks denoise; a job is done and its mp4 has the frames asked for."""
    data = tmp_path / "data"
    data.mkdir()
    srv = Server(data, "--set", "device=cpu", "--set", "parallel.seq_p_size=2")
    srv_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ditfleet",
               "serve", "--port", str(srv.port), "--data-dir", str(data), *srv.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(srv.log, "ab") as log:
        srv.proc = subprocess.Popen(srv_cmd, cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.log.read_text()[-3000:]
            try:
                if httpx.get(srv.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with srv.client(headers={}) as c:
            health = c.get("/healthz").json()
            assert health["launcher"] == "torchrun" and health["world_size"] == 2, health
            done = wait_for(c, submit(c, prompt="two ranks", frames=9, size="64x64", steps=3)["id"], timeout=180)
            assert done["state"] == "done", done
            out = tmp_path / "t.mp4"
            out.write_bytes(c.get(done["content_url"]).content)
            assert read_video(out).shape[0] == 9
    finally:
        srv.stop()
