"""Text that reaches the terminal: strings read from files are shown, never interpreted.

Tensor names, module names, manifest fields, paths and config values come from files a
user may not have written. :func:`safe_text` escapes their control characters (an escape
sequence could otherwise recolour, retitle or clear the terminal); :func:`safe_renderable`
applies it to every string of a rich table and turns plain strings into :class:`Text`,
which rich never parses for markup.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["safe_text", "safe_renderable"]

# C0 controls but tab and newline, DEL, C1 controls, and the bidirectional overrides that
# can make a name read as another (U+202A-U+202E, U+2066-U+2069).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe_text(value: object) -> str:
    """``str(value)`` with control characters written as ``\\xNN`` (``\\x1b`` for ESC)."""
    return _CONTROL.sub(_escape, str(value))


def safe_renderable(obj: Any) -> Any:
    """A string becomes an escaped, markup-free :class:`rich.text.Text`; a table has the
    same done to its title, caption, headers and every string cell (in place)."""
    from rich.table import Table
    from rich.text import Text

    if isinstance(obj, str):
        return Text(safe_text(obj))
    if isinstance(obj, Text):
        return Text(safe_text(obj.plain), style=obj.style)
    if isinstance(obj, Table):
        # a title or caption (a path, often) is never folded or cut to the table's width
        for attr in ("title", "caption"):
            if getattr(obj, attr) is not None:
                setattr(obj, attr, Text(safe_text(getattr(obj, attr)), no_wrap=True, overflow="ignore"))
        for column in obj.columns:
            column.header = safe_renderable(column.header)
            column._cells = [safe_renderable(c) for c in column._cells]
    return obj
