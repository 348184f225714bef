"""Text from outside, made safe to print on a terminal.

Why: a custom_id, a batch name or a provider's error message is chosen by whoever wrote
the job file or runs the provider. Printed raw, an ANSI/OSC escape sequence in it can
clear the screen, rewrite earlier lines (hide a failure), set the window title, or emit
OSC 8 links and, on some terminals, answer-back sequences. So every such text goes
through `escape` before it reaches a terminal: control characters become visible
`\\x1b`-style escapes, which also defuses every escape sequence (they all start with a
control character: ESC, or the C1 codes 0x80-0x9f). Unicode bidi controls, which can
make a line read differently from what it contains, are escaped the same way.

JSON output (`--json`, the JSON log format) needs none of this: JSON escapes control
characters itself.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

# C0 controls (but tab/newline, handled by `multiline`), DEL, C1 controls, bidi controls.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, multiline: bool = False) -> str:
    """`text` with every control character shown as an escape (`\\x1b`, `\\u202e`), so
    nothing in it acts on the terminal. Newlines and tabs are kept only if `multiline`
    (a custom_id or a table cell must stay on its line)."""
    return (_UNSAFE if multiline else _UNSAFE_LINE).sub(_visible, text)


def for_rich(value: Any) -> str:
    """`escape`d and with rich markup escaped too: for titles and cells of rich tables,
    where `[red]` in a batch name would otherwise be interpreted."""
    from rich.markup import escape as markup_escape

    return markup_escape(escape(str(value)))


def console_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    """A structlog processor for the console renderer: every string value escaped (an
    exception's traceback keeps its newlines)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = escape(value, multiline=key in ("exception", "stack"))
    return event_dict
