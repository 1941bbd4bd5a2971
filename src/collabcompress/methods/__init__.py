"""Compression methods as plug-ins: each fits a layer from its statistics, gives the budget its
loss curve, names its tensors and manifest record (:class:`LayerMethod`).

Adding a method is one module with one :class:`LayerMethod` object, returned here by
:func:`method_for` for the layers it handles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..files.arch import AttentionSpec
from ..files.manifest import LayerRecord
from .base import FittedLayer, LayerMethod
from .collaborative import COLLABORATIVE
from .rotary import ROTARY

__all__ = ["FittedLayer", "LayerMethod", "method_for", "method_of_layers", "COLLABORATIVE", "ROTARY"]

# The first method that claims a layer is its method; collaborative attention claims every layer.
METHODS: tuple[LayerMethod, ...] = (ROTARY, COLLABORATIVE)


def method_for(layer: AttentionSpec | LayerRecord | dict[str, Any]) -> LayerMethod:
    """The method of a layer (a checkpoint's spec, or a manifest's record, parsed or as JSON)."""
    return next(m for m in METHODS if m.claims(layer))


def method_of_layers(layers: Iterable[AttentionSpec | LayerRecord | dict[str, Any]]) -> LayerMethod:
    """The method whose text the tables of ``layers`` show (one checkpoint's layers share their
    family's): the first that claims any of them; collaborative attention for no layers."""
    layers = list(layers)
    return next((m for m in METHODS if any(m.claims(la) for la in layers)), COLLABORATIVE)
