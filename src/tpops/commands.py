"""POP3 command handlers (RFC 1939, RFC 2449 CAPA) and the per-state command tables.

A handler is a plain function of ``(session, args)`` that returns a :class:`Reply`;
it never writes to the client. The session loop looks the verb up in the table of
the current state, checks the argument count, calls the handler and writes the reply,
so a command in the wrong state or with the wrong arguments is refused in one place.
Index spaces: ``msn`` is the 1-based message number the client sees; ``index`` is
``msn - 1`` into ``Maildir.messages``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from tpops import __version__
from tpops.mailbox.encode import wire_message
from tpops.mailbox.maildir import Message, MessageGone

if TYPE_CHECKING:
    from tpops.session import Session


class State(Enum):
    """RFC 1939 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


@dataclass(slots=True)
class Reply:
    """What a handler answers: a status line, optionally a multi-line body.

    ``lines`` are text lines (CAPA, LIST, UIDL); ``data`` are already byte-stuffed
    CRLF chunks (RETR, TOP). ``bad`` counts towards ``$max_bad_commands``;
    ``auth_failed`` triggers the ``$error_interval`` delay and the failure budget;
    ``close`` ends the connection after this reply.
    """

    ok: bool
    text: str
    lines: Iterable[str] | None = None
    data: Iterable[bytes] | None = None
    bad: bool = False
    auth_failed: bool = False
    close: bool = False

    def status_line(self) -> str:
        return (("+OK " if self.ok else "-ERR ") + self.text).rstrip(" ")


def ok(text: str, **kw: object) -> Reply:
    return Reply(True, text, **kw)  # type: ignore[arg-type]


def err(text: str, code: str | None = None, **kw: object) -> Reply:
    """A negative reply, with an RFC 2449/3206 response code when one fits."""
    return Reply(False, f"[{code}] {text}" if code else text, **kw)  # type: ignore[arg-type]


def bad(text: str) -> Reply:
    """A client mistake (syntax, unknown message): counts towards ``$max_bad_commands``."""
    return Reply(False, text, bad=True)


Handler = Callable[["Session", list[str]], Reply]


@dataclass(frozen=True, slots=True)
class Command:
    """A table entry: the handler and how many arguments it takes (None = rest of line)."""

    handler: Handler
    min_args: int = 0
    max_args: int | None = 0


# ---------------------------------------------------------------------------
# Message numbers


class _MsnError(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def _message(session: Session, arg: str) -> tuple[int, Message]:
    """Resolve a client message number to (msn, message) or raise with a precise reply."""
    if not arg.isascii() or not arg.isdigit():
        raise _MsnError(bad(f"Invalid message number: {_clip(arg)}"))
    msn = int(arg) if len(arg) <= 10 else 0  # never parse an absurdly long number
    if not 0 < msn <= len(session.mailbox.messages):
        raise _MsnError(bad(f"There's no message {_clip(arg)}."))
    msg = session.mailbox.messages[msn - 1]
    if msg.deleted:
        raise _MsnError(bad(f"Message {msn} is deleted."))
    return msn, msg


def _clip(text: str, limit: int = 40) -> str:
    """Client text echoed in a reply: printable, short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _with_message(fn: Callable[[Session, int, Message, list[str]], Reply]) -> Handler:
    """Wrap a handler whose first argument is a message number."""

    def handler(session: Session, args: list[str]) -> Reply:
        try:
            msn, msg = _message(session, args[0])
        except _MsnError as exc:
            return exc.reply
        return fn(session, msn, msg, args[1:])

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


# ---------------------------------------------------------------------------
# AUTHORIZATION


def cmd_user(session: Session, args: list[str]) -> Reply:
    """USER name: remember the name for PASS; tells nothing about whether it exists.

    The name is the rest of the line, as Dovecot takes it: a login is data, spaces included.
    """
    session.pending_user = session.attempted_login = args[0]
    return ok("Send your password.")


def cmd_pass(session: Session, args: list[str]) -> Reply:
    """PASS secret: the whole rest of the line is the password (spaces allowed)."""
    if session.pending_user is None:
        return bad("USER first.")
    login = session.pending_user
    session.pending_user = None
    return session.log_in(login, lambda auth: auth.authenticate(login, args[0].encode("utf-8", "surrogateescape")))


def cmd_apop(session: Session, args: list[str]) -> Reply:
    """APOP name digest (RFC 1939 section 7); the digest is the last word, the name may have spaces."""
    if session.apop_timestamp is None:
        return bad("APOP is not available.")
    login, _, digest = args[0].rpartition(" ")
    if not login or not digest:
        return bad("Missing argument for APOP.")
    stamp = session.apop_timestamp
    return session.log_in(login, lambda auth: auth.authenticate_apop(login, stamp, digest))


def cmd_capa(session: Session, args: list[str]) -> Reply:
    """CAPA (RFC 2449): exactly what works, IMPLEMENTATION only after login."""
    caps = ["TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if session.state is State.TRANSACTION:
        caps.append(f"IMPLEMENTATION tpops-{__version__}")
    return ok("Capability list follows", lines=caps)


def cmd_quit_auth(session: Session, args: list[str]) -> Reply:
    return ok("Bye.", close=True)


# ---------------------------------------------------------------------------
# TRANSACTION


def cmd_stat(session: Session, args: list[str]) -> Reply:
    count, octets = session.mailbox_totals()
    return ok(f"{count} {octets}")


def cmd_list(session: Session, args: list[str]) -> Reply:
    if args:
        return _list_one(session, args)
    count, octets = session.mailbox_totals()
    lines = (f"{msn} {m.octets}" for msn, m in enumerate(session.mailbox.messages, 1) if not m.deleted)
    return ok(f"{count} messages ({octets} octets)", lines=lines)


@_with_message
def _list_one(session: Session, msn: int, msg: Message, rest: list[str]) -> Reply:
    return ok(f"{msn} {msg.octets}")


def cmd_uidl(session: Session, args: list[str]) -> Reply:
    if args:
        return _uidl_one(session, args)
    lines = (f"{msn} {m.uid}" for msn, m in enumerate(session.mailbox.messages, 1) if not m.deleted)
    return ok("Unique-ID list follows", lines=lines)


@_with_message
def _uidl_one(session: Session, msn: int, msg: Message, rest: list[str]) -> Reply:
    return ok(f"{msn} {msg.uid}")


@_with_message
def cmd_retr(session: Session, msn: int, msg: Message, rest: list[str]) -> Reply:
    """RETR n: the whole message, streamed."""
    return _send_message(session, msn, msg, None, f"{msg.octets} octets")


def cmd_top(session: Session, args: list[str]) -> Reply:
    """TOP n k: the header, the blank line and k body lines."""
    lines_arg = args[1]
    if not lines_arg.isascii() or not lines_arg.isdigit():
        return bad(f"Invalid number of lines: {_clip(lines_arg)}")
    return _top(session, args)


@_with_message
def _top(session: Session, msn: int, msg: Message, rest: list[str]) -> Reply:
    return _send_message(session, msn, msg, int(rest[0]), "Top of message follows")


def _send_message(session: Session, msn: int, msg: Message, body_lines: int | None, text: str) -> Reply:
    try:
        fd = session.mailbox.open_message_fd(msg)
    except MessageGone:
        session.log.info("message %d (%s) of %s vanished during the session", msn, msg.uid, session.login_name)
        return err(f"Message {msn} no longer exists.")
    except OSError as exc:
        session.log.error("cannot open message %d of %s: %s", msn, session.login_name, exc.strerror)
        return err(f"Cannot read message {msn}.", "SYS/TEMP")
    try:
        data = wire_message(fd, body_lines)
    except OSError as exc:
        session.log.error("cannot read message %d of %s: %s", msn, session.login_name, exc.strerror)
        return err(f"Cannot read message {msn}.", "SYS/TEMP")
    return ok(text, data=data)


@_with_message
def cmd_dele(session: Session, msn: int, msg: Message, rest: list[str]) -> Reply:
    """DELE n only marks; the file goes at QUIT (UPDATE)."""
    msg.deleted = True
    return ok(f"Message {msn} deleted.")


def cmd_noop(session: Session, args: list[str]) -> Reply:
    return ok("")


def cmd_rset(session: Session, args: list[str]) -> Reply:
    for msg in session.mailbox.messages:
        msg.deleted = False
    count, octets = session.mailbox_totals()
    return ok(f"{count} messages ({octets} octets)")


def cmd_quit_transaction(session: Session, args: list[str]) -> Reply:
    """QUIT: enter UPDATE and remove the messages marked deleted."""
    return session.update()


AUTHORIZATION_COMMANDS: dict[str, Command] = {
    "USER": Command(cmd_user, 1, None),
    "PASS": Command(cmd_pass, 1, None),
    "APOP": Command(cmd_apop, 1, None),
    "CAPA": Command(cmd_capa),
    "QUIT": Command(cmd_quit_auth),
}

TRANSACTION_COMMANDS: dict[str, Command] = {
    "STAT": Command(cmd_stat),
    "LIST": Command(cmd_list, 0, 1),
    "RETR": Command(cmd_retr, 1, 1),
    "DELE": Command(cmd_dele, 1, 1),
    "NOOP": Command(cmd_noop),
    "RSET": Command(cmd_rset),
    "TOP": Command(cmd_top, 2, 2),
    "UIDL": Command(cmd_uidl, 0, 1),
    "CAPA": Command(cmd_capa),
    "QUIT": Command(cmd_quit_transaction),
}

COMMANDS: dict[State, dict[str, Command]] = {
    State.AUTHORIZATION: AUTHORIZATION_COMMANDS,
    State.TRANSACTION: TRANSACTION_COMMANDS,
    State.UPDATE: {},
}

#: Every verb we know in some state: a known verb in the wrong state gets a precise -ERR.
ALL_VERBS = frozenset(AUTHORIZATION_COMMANDS) | frozenset(TRANSACTION_COMMANDS)
