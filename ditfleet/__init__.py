"""ditfleet: distributed inference engine for video diffusion transformers (Wan2.1)."""

__version__ = "0.1.0"
