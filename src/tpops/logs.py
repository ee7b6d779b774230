"""Logging: syslog, the error log, the access log, and escaping of client data.

Every module logs through the stdlib ``logging`` tree under the ``tpops`` logger;
:func:`setup` routes it to syslog (stdlib ``syslog``, ident ``tpops``) and to the
error log. Anything that came from a client passes through :func:`escape` first, so
CR, LF and other control characters can never forge or split a log line.
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]|[\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str | bytes) -> str:
    """Client data made safe for one log line: control characters and backslashes escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return _UNSAFE.sub(_escape_char, text)


def get(name: str) -> logging.Logger:
    """The logger for one tpops module (``tpops.<name>``)."""
    return logging.getLogger(f"tpops.{name}")
