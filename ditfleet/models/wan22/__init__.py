"""Wan2.2 model families; see :mod:`.spec`."""
