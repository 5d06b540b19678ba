"""Ulysses ``"ce"`` (copy-engine pushes + flags) on CPU: U threads stand in for the ranks and an in-process
link for symmetric memory, the copy engines and the stream flags. Checks the layout arithmetic (which rows
go where, per head group, batch, q length != kv length, padded tokens and heads), the epochs and the
flags over successive calls, against float64 attention. Every copy goes through the same 2-D row
check the CUDA copy (``cuMemcpy2DAsync``) needs. The CUDA streams and driver calls themselves only run on
GPUs (tests/gpu/test_sp_gpu.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from dist_utils import run_threads
from ditfleet.attention import reference_attention, resolve
from ditfleet.bench.common import rel_l2
from ditfleet.parallel.cuda_driver import rows_layout
from ditfleet.parallel.ulysses import default_chunks, padded_heads, ulysses_forward
from ditfleet.parallel.ulysses_ce import FLAG_GROUPS, flag_count, ulysses_ce_forward

WAIT_S = 60


class ThreadLinks:
    """The ranks' shared state: one byte buffer and one flag array per rank, one condition for all flags."""

    def __init__(self, u: int):
        self.u = u
        self.bufs: dict[int, torch.Tensor] = {}
        self.flags = {r: torch.zeros(flag_count(u), dtype=torch.int32) for r in range(u)}
        self.cond = threading.Condition()
        self.grow = threading.Barrier(u)
        self.copies = 0

    def rank(self, r: int) -> RankLink:
        return RankLink(self, r)

    def abort(self) -> None:
        """Release every rank blocked on a barrier or a flag (a thread failed)."""
        self.grow.abort()
        with self.cond:
            self.cond.notify_all()


class RankLink:
    def __init__(self, shared: ThreadLinks, rank: int):
        self.s, self.me, self.epoch, self.layout = shared, rank, 0, None
        self.memo: dict = {}

    def begin(self, nbytes: int, layout=None) -> int:
        if self.epoch and layout != self.layout:  # as CudaLink: everyone's earlier work done first
            self.s.grow.wait(timeout=WAIT_S)
        self.layout = layout
        buf = self.s.bufs.get(self.me)
        if buf is None or buf.numel() < nbytes:  # growing is collective, as symmetric memory's rendezvous
            self.s.grow.wait(timeout=WAIT_S)
            # NaN bytes: a row nobody wrote poisons the result
            self.s.bufs[self.me] = torch.full((-(-nbytes // 16) * 16,), 0xFF, dtype=torch.uint8)
            self.memo.clear()  # as CudaLink: plans hold views of the old buffers
            self.s.grow.wait(timeout=WAIT_S)
        self.epoch += 1
        return self.epoch

    def view(self, rank, shape, dtype, offset=0):
        n = 1
        for x in shape:
            n *= x
        return self.s.bufs[rank].view(dtype)[offset:offset + n].view(shape)

    def flag(self, rank, index):
        return self.s.flags[rank][index:index + 1]

    def copier(self, dst, offset, pitch, src_numel):
        """As :class:`~ditfleet.parallel.cuda_driver.Copy2D`: the same checks, then one 2-D copy."""
        rows, width, _ = rows_layout(dst)  # dst rows must be contiguous, as the driver needs
        cols = dst.shape[1]
        assert offset >= 0 and pitch >= cols and offset + (rows - 1) * pitch + cols <= src_numel

        def copy(src, stream=None):
            assert src.dtype == dst.dtype and src.is_contiguous() and src.numel() == src_numel
            dst.copy_(src.reshape(-1).as_strided((rows, cols), (pitch, 1), src.storage_offset() + offset))
            with self.s.cond:
                self.s.copies += 1

        return copy

    def signal(self, flag, value, stream=None):
        with self.s.cond:
            flag.fill_(value)
            self.s.cond.notify_all()

    def wait(self, flag, value, stream=None):
        with self.s.cond:
            if not self.s.cond.wait_for(lambda: int(flag) >= value, timeout=WAIT_S):
                raise TimeoutError(f"flag stuck at {int(flag)} < {value}")


def _run(u, calls, *, b, s_q, s_k, heads, chunks, lse):
    """``calls`` successive Ulysses calls on U threads; returns per call the gathered (out, lse) and the inputs."""
    d = 8
    backend = resolve("torch_sdpa", site="test", device="cpu", dtype=torch.float32).backend
    h_pad = padded_heads(heads, u)
    cq, ck = -(-s_q // u), -(-s_k // u)
    g = torch.Generator().manual_seed(3)
    inputs = []
    for _ in range(calls):
        q = torch.randn(b, s_q, heads, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, s_k, heads, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, s_k, heads, d, generator=g, dtype=torch.float64)
        inputs.append((q, k, v))

    def prep(x, c):  # pad tokens at the end and heads with zeros, fp32
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, h_pad - heads, 0, u * c - x.shape[1]))
        return x

    shared = ThreadLinks(u)

    def rank_main(r):
        link = shared.rank(r)
        comm = type("Comm", (), {"size": u, "rank": r, "group": None})()

        def attend(qf, kv, want_lse, heads_):
            return backend(qf, kv[0], kv[1], scale=d ** -0.5, kv_lens=[s_k] * b, return_lse=want_lse)

        res = []
        for q, k, v in inputs:
            ql = prep(q, cq)[:, r * cq:(r + 1) * cq]
            kl, vl = (prep(x, ck)[:, r * ck:(r + 1) * ck] for x in (k, v))
            res.append(ulysses_ce_forward(ql, kl, vl, comm=comm, attend=attend, return_lse=lse, chunks=chunks, link=link))
        return res

    by_rank = run_threads(u, rank_main, shared.abort)
    results = [[by_rank[r][c] for r in range(u)] for c in range(calls)]
    outs = []
    for c in range(calls):
        out = torch.cat([o for o, _ in results[c]], 1)[:, :s_q, :heads]
        l = torch.cat([x for _, x in results[c]], 2)[:, :heads, :s_q] if lse else None
        outs.append((out, l))
    return outs, inputs, shared


@pytest.mark.parametrize("u,b,s_q,s_k,heads,chunks,lse", [
    (4, 2, 1001, 1001, 6, 2, True),   # padded tokens, 6 heads padded to 8, groups of one head
    (4, 1, 1001, 703, 12, 2, True),   # q length != kv length, uneven groups (2 + 1 heads)
    (2, 2, 257, 257, 6, 1, False),    # one group, no LSE
    (3, 1, 100, 130, 9, 3, True),     # odd group size
])
def test_ulysses_ce_equals_float64(u, b, s_q, s_k, heads, chunks, lse):
    outs, inputs, shared = _run(u, 3, b=b, s_q=s_q, s_k=s_k, heads=heads, chunks=chunks, lse=lse)
    for (out, l), (q, k, v) in zip(outs, inputs):  # 3 calls: epochs, buffers reused
        ref, ref_lse = reference_attention(q, k, v)
        assert rel_l2(out, ref) <= 1e-5
        if lse:
            assert rel_l2(l, ref_lse) <= 1e-5
    n_groups = min(chunks, padded_heads(heads, u) // u)
    # per call, rank and group: q, k, v into every peer's inbox, outputs and LSE into every peer's outbox
    assert shared.copies == 3 * u * n_groups * b * (3 + 1 + lse) * (u - 1)  # 2-D copies only, none to itself
    for r in range(u):  # every peer's in/out flag of every group reached the last epoch; own slots and unused groups 0
        f = shared.flags[r].view(2, FLAG_GROUPS, u)
        want = torch.zeros_like(f)
        want[:, :n_groups] = 3
        want[:, :, r] = 0
        assert torch.equal(f, want)


def test_shapes_changing_between_calls_wait_for_every_reader():
    """Large, small, large: the large call's inbox covers the small call's outbox. A rank still copying its
    outbox (made slow here) must not see the peer's next pushes there: the link synchronizes when the
    layout changes (without that, this fails: rel L2 ~2)."""
    import time

    u, d, heads = 2, 8, 4
    backend = resolve("torch_sdpa", site="test", device="cpu", dtype=torch.float32).backend
    shared = ThreadLinks(u)
    out_flags = shared.flags[1][FLAG_GROUPS * u:]

    class SlowReader(RankLink):
        def wait(self, flag, value, stream=None):
            super().wait(flag, value)
            if self.me == 1 and value == 2 and flag.data_ptr() >= out_flags.data_ptr():
                time.sleep(0.3)  # rank 1 is slow to copy its outbox of call 2 (the small one)

    g = torch.Generator().manual_seed(0)
    calls = [tuple(torch.randn(1, s, heads, d, generator=g) for _ in range(3)) for s in (400, 50, 400)]

    def rank_main(r):
        link = SlowReader(shared, r)
        comm = type("Comm", (), {"size": u, "rank": r, "group": None})()
        res = []
        for q, k, v in calls:
            s = q.shape[1] // u
            sl = slice(r * s, (r + 1) * s)
            res.append(ulysses_ce_forward(
                q[:, sl], k[:, sl], v[:, sl], comm=comm, return_lse=False, chunks=1, link=link,
                attend=lambda qf, kv, want, _h: backend(qf, kv[0], kv[1], scale=d ** -0.5, return_lse=want)))
        return res

    by_rank = run_threads(u, rank_main, shared.abort)
    res = [[by_rank[r][c] for r in range(u)] for c in range(len(calls))]
    for c, (q, k, v) in enumerate(calls):
        out = torch.cat([o for o, _ in res[c]], 1)
        assert rel_l2(out, reference_attention(q, k, v)[0]) <= 1e-5, c


def test_unknown_ulysses_impl_is_refused():
    with pytest.raises(ValueError, match="ulysses impl must be one of"):
        ulysses_forward(*(torch.zeros(1, 4, 2, 8),) * 3, comm=None, attend=None, return_lse=False, impl="nccl")


def test_default_chunks_pairs_heads_on_ce_only():
    assert [default_chunks("ce", h) for h in (1, 2, 3, 10, 20)] == [1, 1, 2, 5, 10]
    assert default_chunks("p2p", 10) == default_chunks("packed", 10) == 1

