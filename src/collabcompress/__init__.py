"""collabcompress: compress transformer attention into collaborative multi-head attention.

Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of Concatenate",
arXiv 2006.16362.
"""

import os as _os

# Idle OpenMP threads that spin make small matrix products 1000x slower when other
# processes share the cores; passive waiting costs nothing measurable here. Only takes
# effect when torch has not been imported yet, and never overrides the user's setting.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The public API, imported when first used (``import collabcompress`` stays light: the CLI's
# printing commands never import torch).
_PUBLIC = {
    "analyze": "collabcompress.commands.analyze",
    "compress": "collabcompress.commands.compress",
    "CompressOptions": "collabcompress.options",
    "calibrate": "collabcompress.commands.calibrate",
    "verify": "collabcompress.commands.verify",
    "build_report": "collabcompress.commands.report",
    "bench": "collabcompress.commands.bench",
    "evaluate": "collabcompress.commands.evaluate",
    "from_pretrained": "collabcompress.hf",
    "load_model": "collabcompress.hf",
    "method_for": "collabcompress.methods",
    "CollabError": "collabcompress.errors",
    "BadInputError": "collabcompress.errors",
    "UnsupportedArchitectureError": "collabcompress.errors",
    "VerifyThresholdError": "collabcompress.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'collabcompress' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
