"""Sparge checkpoints: SpargeAttn's format in .pt and .safetensors, exact per-layer matching, validation errors."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from ditfleet.attention.sparge import SpargeParams
from ditfleet.attention.sparge_ckpt import (
    FIELDS,
    KEY_TEMPLATE,
    SpargeCheckpoint,
    SpargeCheckpointError,
    layer_params,
    load_sparge_checkpoint,
    read_state,
    save_sparge_checkpoint,
)
from ditfleet.errors import UserError

L, H = 20, 4


def state(layers=range(L), heads=H, prefix="blocks.{i}.self_attn.inner_attention.", seed=0):
    """A SpargeAttn-format dict whose values identify their block: cdfthreshd = 0.5 + i / 100."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        p = prefix.format(i=i)
        out[p + "is_sparse"] = torch.rand(heads, generator=g) > 0.3
        out[p + "cdfthreshd"] = torch.full((heads,), 0.5 + i / 100)
        out[p + "simthreshd1"] = torch.rand(heads, generator=g) * 2 - 1
        out[p + "simthreshd2"] = torch.zeros(heads)
        out[p + "pvthreshd"] = torch.rand(heads, generator=g) * 50
    return out


def write(tmp_path, st, name="ckpt.pt"):
    p = tmp_path / name
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(st, str(p))
    else:
        torch.save(st, str(p))
    return p


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pth"])
def test_round_trip_both_formats(tmp_path, suffix):
    path = write(tmp_path, state(), "orig" + suffix)
    ckpt = load_sparge_checkpoint(path, num_layers=L, num_heads=H)
    assert sorted(ckpt.layers) == list(range(L)) and not ckpt.missing
    out = save_sparge_checkpoint(ckpt, tmp_path / ("copy" + suffix))
    again = load_sparge_checkpoint(out, num_layers=L, num_heads=H)
    for i in range(L):
        a, b = ckpt.params(i), again.params(i)
        for name in FIELDS:
            assert torch.equal(getattr(a, name), getattr(b, name)), (i, name)
    raw = read_state(out)
    assert set(raw) == {KEY_TEMPLATE.format(layer=i, field=f) for i in range(L) for f in FIELDS}
    assert raw[KEY_TEMPLATE.format(layer=3, field="is_sparse")].dtype == torch.bool  # SpargeAttn's dtypes
    assert raw[KEY_TEMPLATE.format(layer=3, field="cdfthreshd")].dtype == torch.float32
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # atomic save leaves no temporary behind
    if suffix != ".safetensors":  # what SpargeAttn's own loader reads: a flat state dict through torch.load
        assert isinstance(torch.load(out, weights_only=True), dict)


def test_prefix_trap_block_1_is_not_block_10(tmp_path):
    ckpt = load_sparge_checkpoint(write(tmp_path, state()), num_layers=L, num_heads=H)
    for i in range(L):
        assert torch.allclose(ckpt.params(i).cdfthreshd, torch.full((H,), 0.5 + i / 100))
    # a file with blocks 10..19 only: block 1 has nothing (dense), never block 10's or 19's thresholds
    part = load_sparge_checkpoint(write(tmp_path, state(range(10, 20)), "part.pt"), num_layers=L, num_heads=H)
    assert part.params(1) is None and part.missing == list(range(10))
    assert torch.allclose(part.params(10).cdfthreshd, torch.full((H,), 0.6))


def test_absent_layers_run_dense_with_one_warning(tmp_path, caplog):
    path = write(tmp_path, state([0, 2, 3, 7]))
    with caplog.at_level(logging.WARNING, logger="ditfleet.attention.sparge_ckpt"):
        ckpt = load_sparge_checkpoint(path, num_layers=10, num_heads=H)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "1, 4-6, 8-9" in msgs[0] and str(path) in msgs[0]
    params = layer_params(num_layers=10, num_heads=H, checkpoint=ckpt)
    assert [p is None for p in params] == [i not in (0, 2, 3, 7) for i in range(10)]


def test_diffusers_and_wrapper_prefixes_accepted(tmp_path):
    st = state(range(3), prefix="model.blocks.{i}.attn1.inner_attention.")
    ckpt = load_sparge_checkpoint(write(tmp_path, st), num_layers=3, num_heads=H)
    assert sorted(ckpt.layers) == [0, 1, 2]
    both = {**state([0]), **state([0], prefix="blocks.{i}.attn1.inner_attention.")}
    with pytest.raises(SpargeCheckpointError, match="twice"):
        load_sparge_checkpoint(write(tmp_path, both, "both.pt"), num_layers=3, num_heads=H)


def _bad(tmp_path, st, match, *, name="bad.pt", layers=L, heads=H):
    path = write(tmp_path, st, name)
    with pytest.raises(SpargeCheckpointError, match=match) as info:
        load_sparge_checkpoint(path, num_layers=layers, num_heads=heads)
    assert str(path) in str(info.value)  # every message names the file
    assert isinstance(info.value, UserError)
    return str(info.value)


def test_malformed_checkpoints_are_refused_clearly(tmp_path):
    key = KEY_TEMPLATE.format(layer=5, field="cdfthreshd")
    st = state()
    msg = _bad(tmp_path, st, r"expected \[8\]", heads=8)  # wrong head count
    assert "blocks.0.self_attn.inner_attention" in msg
    st = state()
    st[key][2] = float("nan")
    assert key in _bad(tmp_path, st, "NaN")
    st = state()
    del st[KEY_TEMPLATE.format(layer=4, field="pvthreshd")]
    assert "blocks.4.self_attn.inner_attention.pvthreshd" in _bad(tmp_path, st, "missing key")
    st = state()
    st[key] = torch.full((H,), 1.5)
    assert key in _bad(tmp_path, st, r"outside \[0.0, 1.0\]")
    st = state()
    st[KEY_TEMPLATE.format(layer=1, field="simthreshd1")] = torch.full((H,), -2.0)
    _bad(tmp_path, st, r"outside \[-1.0, 1.0\]")
    st = state()
    st[KEY_TEMPLATE.format(layer=1, field="pvthreshd")] = torch.full((H,), -1.0)
    _bad(tmp_path, st, ">= 0.0")
    st = state()
    st[KEY_TEMPLATE.format(layer=1, field="is_sparse")] = torch.tensor([0.0, 1.0, 0.5, 1.0])
    _bad(tmp_path, st, "0 or 1")
    st = state()
    st[KEY_TEMPLATE.format(layer=1, field="cdfthreshd")] = torch.full((1, H), 0.9)
    _bad(tmp_path, st, "shape")
    _bad(tmp_path, state(range(25)), r"block\(s\) \[20, 21, 22, 23, 24\].*20 blocks")  # tuned for a deeper model
    _bad(tmp_path, {**state(), "blocks.1.self_attn.q.weight": torch.zeros(4)}, "unexpected key")
    _bad(tmp_path, {**state(), "blocks.01.self_attn.inner_attention.cdfthreshd": torch.zeros(4)}, "unexpected key")
    _bad(tmp_path, {"state_dict": state()}, "flat state dict")
    _bad(tmp_path, {}, "no tensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SpargeCheckpointError, match="cannot be read"):
        load_sparge_checkpoint(tmp_path / "junk.pt", num_layers=L, num_heads=H)
    with pytest.raises(SpargeCheckpointError, match="does not exist"):
        load_sparge_checkpoint(tmp_path / "nope.safetensors", num_layers=L, num_heads=H)
    with pytest.raises(SpargeCheckpointError, match="expected a"):
        load_sparge_checkpoint(tmp_path / "ckpt.bin", num_layers=L, num_heads=H)


class _Payload:
    """A pickle that runs code when loaded without weights_only (what must never happen)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    st = state(range(2))
    st["blocks.0.self_attn.inner_attention.extra"] = _Payload(marker)
    torch.save(st, str(path))
    with pytest.raises(SpargeCheckpointError, match="refused") as info:
        load_sparge_checkpoint(path, num_layers=2, num_heads=H)
    assert "weights_only" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a plain pickle (not torch's zip format) with code
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(SpargeCheckpointError):
        load_sparge_checkpoint(raw, num_layers=2, num_heads=H)
    assert not marker.exists()


def test_broadcast_state_and_topk_and_pickling():
    """Workers rebuild the checkpoint from the broadcast state dict (never the file); it pickles for Ray."""
    ckpt = SpargeCheckpoint.from_state_dict(state(range(3)), num_layers=3, num_heads=H, source="driver")
    again = SpargeCheckpoint.from_state_dict(ckpt.state_dict(), num_layers=3, num_heads=H, warn_missing=False)
    assert torch.equal(again.params(2).simthreshd1, ckpt.params(2).simthreshd1)
    clone = pickle.loads(pickle.dumps(ckpt))
    assert torch.equal(clone.params(1).cdfthreshd, ckpt.params(1).cdfthreshd)
    with pytest.raises(SpargeCheckpointError, match="validated for"):
        layer_params(num_layers=4, num_heads=H, checkpoint=ckpt)
    tk = layer_params(num_layers=5, num_heads=H, topk=0.5)
    assert len(tk) == 5 and tk[0].mode == "topk" and bool(tk[0].is_sparse.all())
    with pytest.raises(ValueError):
        SpargeParams.topk_mode(H, 1.5)
    dense = ckpt.with_layer(0, SpargeParams.thresholds(H, cdfthreshd=1.0, simthreshd1=1.0, is_sparse=False))
    assert not bool(dense.params(0).is_sparse.any())
