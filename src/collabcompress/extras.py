"""The one guard for optional dependencies (extras): import them, or say how to install them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .errors import MissingExtraError

__all__ = ["require_transformers", "require_matplotlib", "unreadable_model_errors", "quiet_transformers"]


def require_transformers(purpose: str = "this") -> Any:
    """The ``transformers`` module; :class:`MissingExtraError` with the install hint when absent.

    ``purpose`` starts the message: "<purpose> needs transformers: pip install ...".
    """
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError(f"{purpose} needs transformers: pip install 'collabcompress[hf]'") from e
    return transformers


def unreadable_model_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a model directory it cannot read, a bad input rather than a
    bug: OSError, ValueError, KeyError, and huggingface_hub's strict-dataclass errors (with
    which transformers 5.1x refuses a config field of the wrong type, e.g. ``architectures``)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (OSError, ValueError, KeyError)
    return (OSError, ValueError, KeyError, StrictDataclassError)


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; :class:`MissingExtraError` with the
    install hint when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingExtraError("plotting needs matplotlib: pip install 'collabcompress[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or info logs on the user's terminal while models load."""
    hf_logging = require_transformers("loading a compressed model").utils.logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
