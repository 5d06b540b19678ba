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
def tiny_folders(tiny_cache):
    """``{"t2v": folder, "i2v": folder}``: the embedded tiny models as Diffusers folders (a model_path)."""
    from ditfleet.engine.tiny import tiny_model_path

    return {task: tiny_model_path(task) for task in ("t2v", "i2v")}
