"""Model families by name, imported only when asked for (the attention registry's pattern).

Adding a family is one folder under ``ditfleet/models/`` with a :class:`~ditfleet.models.spec.ModelSpec`
subclass, and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .spec import ModelSpec

log = logging.getLogger(__name__)

MODEL_CLS_KEY = "model_cls"

#: family -> "module:class" of its ModelSpec. Order matters for :func:`detect`: the first that claims a folder.
FAMILIES: dict[str, str] = {
    "wan2.2_moe": "ditfleet.models.wan22.spec:Wan22MoeSpec",
    "wan2.2": "ditfleet.models.wan22.ti2v:Wan22Ti2vSpec",
    "wan2.1": "ditfleet.models.wan.spec:Wan21Spec",
}

_SPECS: dict[str, ModelSpec] = {}


def spec_for(family: str) -> ModelSpec:
    """The spec of ``family``.

    Raises:
        ConfigError: (``model_cls``) an unknown family, naming the valid ones.
    """
    if family not in FAMILIES:
        from ..errors import ConfigError

        raise ConfigError(MODEL_CLS_KEY, f"unknown model family {family!r}; valid: {', '.join(sorted(FAMILIES))} "
                                         "(or null: picked from the model folder)")
    if family not in _SPECS:
        module, name = FAMILIES[family].split(":")
        _SPECS[family] = getattr(importlib.import_module(module), name)()
    return _SPECS[family]


def detect(root: Path) -> str:
    """The family of model folder ``root``: the first spec of :data:`FAMILIES` that claims it (else ``wan2.1``,
    whose loader then says what is wrong with the folder)."""
    for family in FAMILIES:
        if spec_for(family).claims(root):
            return family
    return "wan2.1"


def resolve_family(model_cls: str | None, root: Path) -> ModelSpec:
    """The spec a run uses: ``model_cls`` when given (checked against the folder), else the folder's family.

    Raises:
        ConfigError: (``model_cls``) unknown, or the folder is another family's.
    """
    found = detect(root)
    if model_cls is None:
        spec = spec_for(found)
    else:
        spec = spec_for(model_cls)
        if found != model_cls and spec_for(found).experts != spec.experts:
            from ..errors import ConfigError

            raise ConfigError(MODEL_CLS_KEY, f"{model_cls!r} ({spec.description}), but {root} is a {found} folder "
                                             f"({spec_for(found).description}); set model_cls to {found!r} or null")
    log.debug("model family %s (%s) for %s", spec.family, spec.description, root)
    return spec
