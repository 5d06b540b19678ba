"""``ditfleet bench dit`` in its CPU smoke mode (``--tiny``): runs, writes the JSON the GPU run writes."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ditfleet.bench import dit
from ditfleet.errors import UserError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    dit.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("model", ["t2v-14b", "i2v-14b"])
def test_bench_dit_tiny_cpu(tmp_path, model):
    pytest.importorskip("diffusers")
    out = tmp_path / "dit.json"
    args = parse("--tiny", "--device", "cpu", "--model", model, "--diffusers", "--iters", "1", "--block-iters", "1",
                 "--block-warmup", "0", "--warmup", "0", "--out", str(out))
    assert dit.main(args) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "dit" and data["config"]["tokens"] == 3 * 4 * 6 and data["config"]["tiny"]
    (res,) = data["results"]
    assert res["status"] == "ok" and res["kernel"] == "sdpa_cpu_flash"
    for key in ("attention_ms", "block_linears_ms", "block_ms", "forward_s"):
        assert res[key] > 0, key
    diff = data["diffusers"]
    assert diff["status"] == "ok" and diff["forward_s"] > 0
    assert diff["rel_l2_vs_ditfleet"] < 3e-2  # same weights, bf16 on both sides
    assert data["summary"]["fastest_kernel"] == "sdpa_cpu_flash"


def test_bench_dit_refuses_full_size_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="--tiny"):
        dit.main(parse("--device", "cpu"))
    with pytest.raises(UserError, match="4n\\+1"):
        dit.main(parse("--tiny", "--frames", "10"))
    with pytest.raises(UserError, match="unknown kernel"):
        dit.main(parse("--tiny", "--kernels", "nope"))
