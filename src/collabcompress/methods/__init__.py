"""Compression methods as plug-ins: each fits a layer from its statistics, gives the budget its
loss curve, names its tensors and manifest record (:class:`LayerMethod`).

Adding a method is one module with one :class:`LayerMethod` object, returned here by
:func:`method_for` for the layers it handles.
"""

from __future__ import annotations

from typing import Any

from ..files.arch import AttentionSpec
from ..files.manifest import LayerRecord
from .base import FittedLayer, LayerMethod
from .collaborative import COLLABORATIVE
from .rotary import ROTARY

__all__ = ["FittedLayer", "LayerMethod", "method_for", "COLLABORATIVE", "ROTARY"]


def method_for(layer: AttentionSpec | LayerRecord | dict[str, Any]) -> LayerMethod:
    """The method of a layer (a checkpoint's spec, or a manifest's record, parsed or as JSON): shared
    rotary keys for a rotary layer, collaborative attention otherwise."""
    rotary = layer.get("rotary") if isinstance(layer, dict) else layer.rotary
    return ROTARY if rotary else COLLABORATIVE
