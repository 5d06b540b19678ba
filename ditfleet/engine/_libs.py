"""Helpers around the Hugging Face libraries the engine loads components with."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_libraries():
    """Silence Diffusers / transformers info messages and progress bars (loading, saving) inside the block."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dv, tv = dlog.get_verbosity(), tlog.get_verbosity()
    dbar, tbar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(dv)
        tlog.set_verbosity(tv)
        if dbar:
            dlog.enable_progress_bar()
        if tbar:
            tlog.enable_progress_bar()
