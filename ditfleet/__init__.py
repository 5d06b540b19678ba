"""ditfleet: distributed inference engine for video diffusion transformers (Wan2.1)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ditfleet.Engine`` / ``ditfleet.EngineError``, imported on first use (the CLI stays light)."""
    if name in ("Engine", "EngineError"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ditfleet' has no attribute {name!r}")
