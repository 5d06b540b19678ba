"""Errors a user can cause while generating (all :class:`~ditfleet.errors.UserError`: exit 2, one message)."""

from __future__ import annotations

from ..errors import UserError


class ModelFolderError(UserError):
    """``model_path`` is missing, incomplete, or not in the layout the pipeline reads (names the file)."""


class ImageError(UserError):
    """The I2V reference image is missing, unreadable, or not given."""


class OutputError(UserError):
    """The output path has an unsupported suffix or cannot be written."""


class JobsFileError(UserError):
    """The jobs file cannot be read, or one of its lines is malformed (names the line number)."""


class RequestError(UserError):
    """A request (one job, or the config's single request) asks for something invalid (names the field)."""
