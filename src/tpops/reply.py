"""What a protocol state hands back to the session loop: replies, and the state/exchange contracts.

This module imports nothing of the protocol above it, so the loop
(:mod:`tpops.session`), the argument parser (:mod:`tpops.commands`) and the state
modules (:mod:`tpops.authorization`, :mod:`tpops.transaction`, later STLS and SASL)
all depend on it and never on each other in a circle.

A handler returns a :class:`Reply`; only the loop writes it. Besides the status line
and an optional body, a reply tells the loop what to do next:

``state``
    The loop switches to this :class:`State` object (a successful login returns the
    :class:`~tpops.transaction.Transaction`). The switch happens before the reply is
    written, so a connection lost while writing still ends the new state (its lock is
    released, its log line written).
``exchange``
    The next client line is not a command: the loop hands it, raw and up to
    ``exchange.max_line`` octets, to this :class:`Exchange` (a SASL AUTH in
    progress, after a ``+ challenge`` continuation written by :func:`more`). The
    exchange answers with another reply; one without ``exchange`` ends it.
``upgrade``
    After writing and flushing this reply, the loop discards any client input it has
    already buffered (a pipelined command must not survive a TLS upgrade), replaces
    its transport with ``upgrade(transport)`` and reads and writes through the new
    one from then on (STLS).
``handoff``
    The login succeeded as far as root must take it (credentials, lock, the owner's
    identity) and the rest of the session belongs to a process of that identity (root
    mode's post-login process, :mod:`tpops.postlogin`). The loop gives it to its
    owner's ``hand_off``; when that took the connection over, the loop ends without
    writing anything, else it serves the login here
    (:meth:`~tpops.authorization.Authorization.serve_here`).
``bad`` / ``auth_failed`` / ``close``
    Count towards ``$max_bad_commands``; apply the ``$error_interval`` delay; end the
    connection after this reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tpops.protocol import LineTooLong, Transport

if TYPE_CHECKING:
    from tpops.postlogin import HandOff


@dataclass(slots=True)
class Reply:
    """One answer to the client: a status line, optionally a multi-line body.

    ``lines`` are text lines (CAPA, LIST, UIDL); ``data`` are already byte-stuffed
    CRLF chunks (RETR, TOP). ``continuation`` makes the status line ``+ text`` (a SASL
    challenge). The remaining fields are the loop instructions of the module docstring.
    """

    ok: bool
    text: str
    lines: Iterable[str] | None = None
    data: Iterable[bytes] | None = None
    bad: bool = False
    auth_failed: bool = False
    close: bool = False
    continuation: bool = False
    state: State | None = None
    exchange: Exchange | None = None
    upgrade: Callable[[Transport], Transport] | None = None
    handoff: HandOff | None = None

    def status_line(self) -> str:
        if self.continuation:
            return "+ " + self.text
        return (("+OK " if self.ok else "-ERR ") + self.text).rstrip(" ")


def ok(
    text: str,
    *,
    lines: Iterable[str] | None = None,
    data: Iterable[bytes] | None = None,
    close: bool = False,
    state: State | None = None,
    upgrade: Callable[[Transport], Transport] | None = None,
) -> Reply:
    """A positive reply."""
    return Reply(True, text, lines=lines, data=data, close=close, state=state, upgrade=upgrade)


def err(text: str, code: str | None = None, *, auth_failed: bool = False, close: bool = False) -> Reply:
    """A negative reply, with an RFC 2449/3206 response code when one fits."""
    return Reply(False, f"[{code}] {text}" if code else text, auth_failed=auth_failed, close=close)


def bad(text: str) -> Reply:
    """A client mistake (syntax, unknown message): counts towards ``$max_bad_commands``."""
    return Reply(False, text, bad=True)


def more(text: str, exchange: Exchange) -> Reply:
    """A continuation (``+ text``, RFC 5034): the next client line goes to ``exchange``."""
    return Reply(True, text, continuation=True, exchange=exchange)


@dataclass(frozen=True, slots=True)
class Accounting:
    """What a state knows for the access log when the session ends."""

    login: str | None = None  #: the logged-in login, or the last one attempted
    logged_in: bool = False
    start_msgs: int = 0
    start_octets: int = 0
    end_msgs: int = 0
    end_octets: int = 0
    dropped_privileges: bool = False


class State(Protocol):
    """A protocol state object the loop drives (AUTHORIZATION, TRANSACTION, ...)."""

    @property
    def name(self) -> str:
        """The RFC 1939 state name, for ``-ERR X is not valid in the NAME state.``"""
        ...

    @property
    def log_name(self) -> str:
        """The login this state is about, escaped for a log line ("" if none yet)."""
        ...

    def execute(self, verb: str, rest: str) -> Reply | None:
        """Run one command line (verb ASCII upper-cased, ``rest`` after the first SP);
        None when this state has no such verb."""
        ...

    def accounting(self) -> Accounting:
        """The access-log facts as of now."""
        ...

    def end(self, reason: str) -> None:
        """The connection is over (``reason`` as logged): release what the state holds."""
        ...


class Exchange(Protocol):
    """A multi-line exchange that owns the client's next line (a SASL AUTH in progress)."""

    @property
    def max_line(self) -> int:
        """The longest line accepted, in octets without the line end (RFC 5034: 8 KiB ok)."""
        ...

    def step(self, line: bytes | LineTooLong) -> Reply:
        """Answer one raw client line (``*`` cancels, by RFC 5034: the exchange's business)."""
        ...
