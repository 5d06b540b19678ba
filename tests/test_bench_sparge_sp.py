"""``ditfleet bench sparge --sp ring usp ulysses`` end to end on 4 gloo ranks (CPU, fp32, tiny shapes).

A 5 x 6 x 8 video (240 tokens: chunks of 60 on 4 ranks, super-chunks of 120 under USP 2 x 2), 4 heads
of 16, predictor blocks of 16 x 8 tokens (so the masks are really sparse and the chunks cut through
blocks), both input kinds and both settings: every mode runs, its gathered output equals the
single-device Sparge output (rel L2 < 1e-4) and the JSON has the documented structure.
"""

from __future__ import annotations

import json

from dist_utils import run_distributed

MODES = {"ring": (1, 4), "usp": (2, 2), "ulysses": (4, 1)}


def _bench(rank, world, out):
    import argparse

    from ditfleet.bench import sparge as bench
    from ditfleet.parallel import init_distributed

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--cases", "5x6x8", "--heads", "4", "--head-dim", "16", "--dtype", "fp32",
                              "--block-q", "16", "--block-k", "8", "--topk", "0.3", "--warmup", "0", "--iters", "1",
                              "--sp", *MODES, "--out", out])
    return bench.run_sp(args, [("5x6x8", bench.parse_case("5x6x8"))], init_distributed())


def test_bench_sparge_sequence_parallel(tmp_path):
    out = str(tmp_path / "sparge_sp.json")
    assert run_distributed(_bench, 4, out, timeout=240) == [0, 0, 0, 0]
    rep = json.loads(open(out).read())
    assert rep["suite"] == "sparge-sp"
    assert rep["environment"]["world_size"] == 4 and "commit" in rep["environment"] and "card" in rep["environment"]
    assert rep["config"]["modes"] == list(MODES) and rep["config"]["blocks"] == [16, 8]
    (case,) = rep["results"]
    assert case["tokens"] == 240 and case["grid"] == [5, 6, 8] and case["heads"] == 4
    assert [kind["inputs"] for kind in case["inputs"]] == ["random", "structured"]
    sparsities = []
    for kind in case["inputs"]:
        assert set(kind["dense"]["modes"]) == set(MODES)
        assert all("error" not in d and d["ms"] > 0 for d in kind["dense"]["modes"].values()), kind["dense"]
        assert kind["dense"]["single_device_ms"] > 0
        assert set(kind["settings"]) == {"topk", "thr"}
        for setting, r in kind["settings"].items():
            one = r["single_device"]
            assert "error" not in one and one["ms"] > 0 and one["first_call_s"] >= 0, (setting, one)
            assert 0 <= r["sparsity"] < 1 and one["vs_dense"]["cosine"] > 0.5
            sparsities.append(r["sparsity"])
            assert set(r["modes"]) == set(MODES)
            for mode, m in r["modes"].items():
                sp = m["sparge"]
                where = (kind["inputs"], setting, mode, sp)
                assert "error" not in sp, where
                assert (m["ulysses"], m["ring"]) == MODES[mode]
                assert sp["ms"] > 0 and sp["first_call_s"] >= 0 and sp["speedup"] > 0 and sp["finite"], where
                assert m["dense_ms"] == kind["dense"]["modes"][mode]["ms"]
                assert sp["vs_single_device"]["rel_l2"] < 1e-4 and sp["vs_single_device"]["cosine"] > 0.9999, where
                assert abs(sp["vs_dense"]["rel_l1"] - one["vs_dense"]["rel_l1"]) < 1e-4, where
                assert ("schedule" in m) == (mode != "ulysses")
                if "schedule" in m:
                    sched = m["schedule"]
                    assert sched["ring_size"] == m["ring"]
                    assert sched["steps"] + sched["steps_skipped"] == m["ring"] ** 2
    assert max(sparsities) > 0.1  # the masks skip something: the SP paths are checked on sparse masks
