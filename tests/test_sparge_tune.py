"""``ditfleet sparge-tune``: the per-head search, the q/k/v capture, the CLI (tiny model on CPU), resume."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ditfleet.attention.base import AttentionBackend, Capabilities
from ditfleet.attention.sparge import SpargeParams, block_sparse_math, predict_block_mask
from ditfleet.attention.sparge_ckpt import SpargeCheckpoint, load_sparge_checkpoint, save_sparge_checkpoint
from ditfleet.bench.sparge import structured_qkv
from ditfleet.errors import UserError
from ditfleet import sparge_tune

CPU = torch.device("cpu")


def test_search_picks_the_sparsest_setting_within_the_bound_per_head():
    q, k, v = structured_qkv((4, 8, 16), 2, 32, dtype=torch.float32, device=CPU, seed=0)
    g = torch.Generator().manual_seed(1)  # head 1: random q / k, near-uniform attention: nothing to skip safely
    q[:, :, 1] = torch.randn(q[:, :, 1].shape, generator=g)
    k[:, :, 1] = torch.randn(k[:, :, 1].shape, generator=g)
    l1 = 0.05
    params, sparsity, err, grid = sparge_tune.search_layer(
        [(q, k, v)], l1=l1, sim_grid=(-0.25, 0.0, 0.25), cdf_grid=(0.5, 0.8, 0.9, 0.95, 0.99))
    assert params.is_sparse.tolist() == [True, False]
    assert float(params.cdfthreshd[1]) == 1.0 and float(params.simthreshd1[1]) == 1.0  # SpargeAttn's dense encoding
    assert sparsity[0] >= 0.1 and err[0] <= l1
    # independent check of the chosen head-0 setting: error and sparsity recomputed from scratch
    m = predict_block_mask(q, k, params)
    ref = block_sparse_math(q, k, v, torch.ones_like(m.blocks), (128, 64), scale=32**-0.5)
    out = block_sparse_math(q, k, v, m.blocks, (128, 64), scale=32**-0.5)
    e0 = float((out - ref)[:, :, 0].abs().sum() / ref[:, :, 0].abs().sum())
    assert abs(e0 - err[0]) < 1e-6
    assert abs((1 - float(m.to_dense()[0, 0].float().mean())) - sparsity[0]) < 1e-9
    # no sparser grid point of head 0 stays within the bound
    rel, sp = torch.tensor(grid["rel_l1"]), torch.tensor(grid["sparsity"])
    assert float(sp[..., 0][rel[..., 0] <= l1].max()) == pytest.approx(sparsity[0])


class _Recorder(AttentionBackend):
    key = "recorder"
    description = "records self-attention inputs"
    caps = Capabilities(lse=True, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def _forward(self, q, k, v, *, scale, return_lse):
        from ditfleet.attention.sparge import _dense_backend

        self.seen.append((q.clone(), k.clone(), v.clone()))
        return _dense_backend(self.device, self.dtype)._forward(q, k, v, scale=scale, return_lse=return_lse)


@pytest.fixture(scope="module")
def tiny():
    from ditfleet.models.wan import WanDiTConfig, build_dit

    return build_dit(WanDiTConfig(**sparge_tune.PRESETS["tiny"]), device="cpu", dtype=torch.float32, seed=0)


def test_capture_block_returns_that_blocks_qkv_and_restores_the_model(tiny):
    from ditfleet.models.wan import SELF_SITE

    inputs = sparge_tune.random_inputs(tiny, latent=(2, 8, 16), samples=1, timesteps=[500.0], seed=0)[0]
    saved = dict(tiny.backends)
    rec = _Recorder(device=CPU, dtype=torch.float32)
    rec.seen = []
    tiny.set_attention({**saved, SELF_SITE: rec})
    with torch.no_grad():
        want = tiny(**inputs)
    tiny.set_attention(saved)
    assert len(rec.seen) == tiny.config.num_layers
    for layer in range(tiny.config.num_layers):
        got = sparge_tune.capture_block(tiny, layer, inputs)
        for a, b in zip(got, rec.seen[layer]):
            assert torch.equal(a, b)
    assert tiny.backends == saved
    with torch.no_grad():
        assert torch.allclose(tiny(**inputs), want, atol=1e-5)


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    sparge_tune.add_arguments(p)
    return p.parse_args(["--preset", "tiny", "--out", str(tmp_path / "tiny.safetensors"), "--samples", "1",
                         "--sim-grid", "0", "--cdf-grid", "0.9", "0.99", "--device", "cpu", *extra])


def test_cli_tunes_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    report = tmp_path / "report.json"
    assert sparge_tune.main(_args(tmp_path, "--report", str(report))) == 0
    ckpt = load_sparge_checkpoint(out, num_layers=2, num_heads=4)
    assert sorted(ckpt.layers) == [0, 1]
    rep = json.loads(report.read_text())
    assert [b["layer"] for b in rep["blocks"]] == [0, 1] and "grid" in rep["blocks"][0]
    with pytest.raises(UserError, match="--resume"):
        sparge_tune.main(_args(tmp_path))
    # an interrupted run: block 0 done (with recognisable values), block 1 not
    mark = SpargeParams.thresholds(4, cdfthreshd=0.123, simthreshd1=0.456)
    save_sparge_checkpoint(SpargeCheckpoint(2, 4, {0: mark}), out)
    capsys.readouterr()
    assert sparge_tune.main(_args(tmp_path, "--resume")) == 0
    text = capsys.readouterr().out
    assert "block 1:" in text and "block 0:" not in text and "(1 tuned now)" in text
    again = load_sparge_checkpoint(out, num_layers=2, num_heads=4)
    assert torch.allclose(again.params(0).cdfthreshd, torch.full((4,), 0.123))
    assert sorted(again.layers) == [0, 1]


def test_cli_argument_errors(tmp_path):
    for extra, match in ((["--l1", "-1"], "--l1"), (["--cdf-grid", "1.5"], "--cdf-grid"), (["--samples", "0"], "--samples"),
                         (["--video", "6", "64", "64"], "4n\\+1")):
        with pytest.raises(UserError, match=match):
            sparge_tune.main(_args(tmp_path, *extra))
    p = argparse.ArgumentParser()
    sparge_tune.add_arguments(p)
    with pytest.raises(UserError, match="--model"):
        sparge_tune.main(p.parse_args(["--out", str(tmp_path / "x.pt")]))
    with pytest.raises(UserError, match="must end in"):
        sparge_tune.main(p.parse_args(["--preset", "tiny", "--out", str(tmp_path / "x.bin")]))
