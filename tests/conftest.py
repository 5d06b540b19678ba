"""Shared fixtures: one tiny-model cache for the session (never the user's ~/.cache), tiny model folders."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """``DITFLEET_CACHE`` for the session (subprocesses inherit it); the tiny models are built there on first use."""
    path = tmp_path_factory.getbasetemp() / "ditfleet-session-cache"
    old = os.environ.get("DITFLEET_CACHE")
    os.environ["DITFLEET_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DITFLEET_CACHE", None)
    else:
        os.environ["DITFLEET_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_folders(tiny_cache, tmp_path_factory):
    """``{"t2v": folder, "i2v": folder, "wan2.2_moe/t2v": folder}``: the embedded tiny models as Diffusers folders (a
    model_path), and a tiny Wan2.2 A14B-style two-expert T2V folder."""
    from ditfleet.engine.tiny import build_components, save_components, tiny_model_path

    out = {task: tiny_model_path(task) for task in ("t2v", "i2v")}
    moe = tmp_path_factory.mktemp("tiny-wan22-moe-t2v")
    save_components(build_components("t2v", family="wan2.2_moe"), moe, "t2v")
    out["wan2.2_moe/t2v"] = moe
    return out


@pytest.fixture
def ftfy_as_ditfleet(monkeypatch):
    """Diffusers' Wan I2V pipeline calls ftfy even when it is not installed; ditfleet then skips it: do the same."""
    import types

    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    from ditfleet.engine import encoders

    if encoders.ftfy is None:
        monkeypatch.setattr(i2v, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
