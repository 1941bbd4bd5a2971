"""Compression methods as plug-ins: each fits a layer from its statistics, gives the budget its
loss curve, names its tensors and manifest record (:class:`LayerMethod`).

Adding a method is one module with one :class:`LayerMethod` object, returned here by
:func:`method_for` for the layers it handles.
"""

from __future__ import annotations

from ..files.arch import AttentionSpec
from .base import FittedLayer, LayerMethod
from .collaborative import COLLABORATIVE
from .rotary import ROTARY

__all__ = ["FittedLayer", "LayerMethod", "method_for", "COLLABORATIVE", "ROTARY"]


def method_for(spec: AttentionSpec) -> LayerMethod:
    """The method that compresses ``spec``'s layer: shared rotary keys for a rotary layer,
    collaborative attention otherwise."""
    return ROTARY if spec.rotary else COLLABORATIVE
