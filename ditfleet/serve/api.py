"""The body of ``POST /v1/videos``: parsing, and the errors a client gets back (status, field, message).

Every check that the CLI runs is the CLI's own code: the config keys go through
:func:`ditfleet.config.load_config` (attention types, per-site rules), the request through
:meth:`ditfleet.engine.Engine.check` (4n+1 frames, size against the model and the device, the image).
This module only turns JSON into those calls and their :class:`~ditfleet.errors.UserError` into
``{"error": {"field": ..., "message": ...}}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re

from ..errors import ConfigError, UserError

#: Request fields a body may set, with their JSON types (``size`` is ``"WxH"`` or ``[W, H]``).
REQUEST_FIELDS = {
    "prompt": ((str,), "a string"),
    "negative_prompt": ((str, type(None)), "a string or null"),
    "image": ((str, type(None)), "a string (a path on the server) or null; or upload it as multipart"),
    "seed": ((int,), "an integer"),
    "frames": ((int,), "an integer (4n+1)"),
    "size": ((str, list), "\"WIDTHxHEIGHT\" or [WIDTH, HEIGHT]"),
    "height": ((int,), "an integer"),
    "width": ((int,), "an integer"),
    "steps": ((int,), "an integer"),
    "shift": ((int, float), "a number"),
    "guide_scale": ((int, float, list), "a number, or [high_noise, low_noise] for a two-expert model"),
    "enable_cfg": ((bool,), "true or false"),
    "solver": ((str,), "\"unipc\" or \"euler\""),
    "fps": ((int,), "an integer"),
}

#: The config's names of request fields (size errors from preflight name these) -> the API's names.
CONFIG_NAMES = {"target_video_length": "frames", "target_height": "height", "target_width": "width",
                "infer_steps": "steps", "sample_solver": "solver", "sample_shift": "shift",
                "sample_guide_scale": "guide_scale", "image_path": "image"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, the ``field`` at fault, one ``message`` naming it."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


def from_user_error(e: UserError, status: int = 400) -> ApiError:
    """The :class:`ApiError` of a user error raised by the shared validation (the field read off its message)."""
    from ..engine.errors import ImageError, OutputError

    msg = str(e)
    if isinstance(e, ConfigError) and e.key:
        field = e.key
    elif isinstance(e, ImageError) or getattr(e, "kind", None) == "ImageError":
        field = "image"
    elif isinstance(e, OutputError) or getattr(e, "kind", None) == "OutputError":
        field = "output"
    else:
        m = re.match(r"([A-Za-z_][\w.]*)[: ]", msg)
        field = m.group(1) if m else "request"
        if field == "task":  # "task i2v needs a reference image"
            field = "image"
    if field in CONFIG_NAMES:  # the API's name, in the message too
        msg = re.sub(rf"\b{field}\b", CONFIG_NAMES[field], msg)
        field = CONFIG_NAMES[field]
    return ApiError(status, field, msg)


def config_keys() -> list[str]:
    """Top-level keys of the run config (a body may name them; only the server's own values are accepted)."""
    from ..config import RunConfig

    return [f.name for f in dataclasses.fields(RunConfig)]


def parse_body(data, cfg) -> tuple[dict, dict]:
    """Split a JSON body into request fields and config keys, type-checked.

    Returns:
        ``(fields, config)``: :class:`~ditfleet.engine.request.GenerateRequest` keyword arguments (``size``
        resolved into ``height``/``width``), and the config keys given.

    Raises:
        ApiError: not an object, an unknown key (with a did-you-mean), a wrong type, no prompt.
    """
    from ..engine.jobs import parse_size

    if not isinstance(data, dict):
        raise ApiError(400, "body", f"body: expected a JSON object {{\"prompt\": ...}}, got {type(data).__name__}")
    ckeys = config_keys()
    fields, config = {}, {}
    for key, value in data.items():
        if key in REQUEST_FIELDS:
            types, name = REQUEST_FIELDS[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ApiError(400, key, f"{key}: expected {name}, got {json.dumps(value)}")
            fields[key] = value
        elif key in CONFIG_NAMES:
            raise ApiError(400, key, f"{key}: give it as {CONFIG_NAMES[key]!r} in a request")
        elif key in ckeys:
            config[key] = value
        else:
            close = difflib.get_close_matches(key, [*REQUEST_FIELDS, *ckeys], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(REQUEST_FIELDS)}"
            raise ApiError(400, key, f"{key}: unknown key; {hint}")
    if "prompt" not in fields:
        raise ApiError(400, "prompt", "prompt: missing (a string: what the video shows)")
    if not fields["prompt"].strip():
        raise ApiError(400, "prompt", "prompt: empty")
    if "size" in fields:
        if "height" in fields or "width" in fields:
            raise ApiError(400, "size", "size: give either size or height/width, not both")
        try:
            fields["height"], fields["width"] = parse_size(fields.pop("size"))
        except ValueError as e:
            raise ApiError(400, "size", f"size: {e}") from None
    if isinstance(fields.get("guide_scale"), list):
        g = fields["guide_scale"]
        if len(g) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g):
            raise ApiError(400, "guide_scale", f"guide_scale: expected [high_noise, low_noise] numbers, got {json.dumps(g)}")
        fields["guide_scale"] = tuple(float(v) for v in g)
    return fields, config


def check_config_keys(config: dict, cfg) -> None:
    """Config keys in a request: validated as ``--set`` would be (the config's own checks, e.g. radial only on
    self-attention); a valid value other than the server's is refused, since it needs a reload.

    Raises:
        ApiError: the first invalid or differing key.
    """
    if not config:
        return
    from ..config import load_config

    for key, value in config.items():
        try:
            new = load_config(None, [f"{key}={json.dumps(value)}"], data=cfg.to_dict(), check_files=False)
        except UserError as e:
            raise from_user_error(e) from None
        if getattr(new, key) != getattr(cfg, key):
            raise ApiError(400, key, f"{key}: this server runs {json.dumps(_plain(getattr(cfg, key)))}; "
                                     f"{json.dumps(value)} needs a reload (start ditfleet serve with --set {key}=...)")


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
