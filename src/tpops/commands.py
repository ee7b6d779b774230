"""POP3 command tables: declared arguments, parsed and validated once, then the handler call.

Each state module (:mod:`tpops.authorization`, :mod:`tpops.transaction`) holds its
handlers and a table ``verb -> Command(handler, args)``; its state object runs a
command line with :func:`dispatch`. A :class:`Command` declares its arguments as
:class:`Arg` kinds, and :func:`dispatch` turns the words after the verb into handler
arguments, or answers the client mistake itself:

- the count: ``-ERR Missing argument for X.`` / ``-ERR Too many arguments for X.``;
- plain arguments (a line count) are checked before message numbers are resolved,
  so ``TOP 9 x`` is about the ``x``;
- a message number is resolved once, as Dovecot's ``get_msgnum``: ASCII digits, an
  existing message, not deleted; the handler receives a :class:`Numbered`
  (``msn`` and the :class:`~tpops.mailbox.maildir.Message`).

Arguments are separated by SP only (RFC 1939; runs of SP are tolerated): a tab, NBSP
or other Unicode space is part of a word, which then is no valid number.

So a handler is ``handler(state, *values)`` with one value per declared argument and
never parses or re-checks one. It returns a :class:`~tpops.reply.Reply` and never
writes to the client. Index spaces: ``msn`` is the 1-based message number the client
sees; ``index`` is ``msn - 1`` into ``Maildir.messages``.

This module knows no state object and no session: it imports only :mod:`tpops.reply`
and the Maildir's :class:`~tpops.mailbox.maildir.Message`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from tpops import __version__
from tpops.mailbox.maildir import Message
from tpops.reply import Reply, bad

#: Digits of the longest message number we parse; a longer one names no message.
_MAX_MSN_DIGITS = 10


class Arg(Enum):
    """What one declared argument is, and what the handler receives for it."""

    MESSAGE = "message"  #: a message number -> :class:`Numbered`
    OPTIONAL_MESSAGE = "optional message"  #: the same, or None when absent (LIST, UIDL)
    LINES = "line count"  #: a decimal count of lines (TOP) -> int
    REST = "rest of line"  #: the whole rest of the line, spaces included (USER, PASS, APOP) -> str


@dataclass(frozen=True, slots=True)
class Numbered:
    """A resolved message argument: the number the client used and the message."""

    msn: int
    message: Message


@dataclass(frozen=True, slots=True)
class Command:
    """A table entry: the handler and its declared arguments, in order.

    ``Arg.REST`` stands alone; ``Arg.OPTIONAL_MESSAGE`` only last.
    """

    handler: Callable[..., Reply]
    args: tuple[Arg, ...] = ()

    def __post_init__(self) -> None:
        if Arg.REST in self.args and self.args != (Arg.REST,):
            raise ValueError("Arg.REST must be a command's only argument")
        if Arg.OPTIONAL_MESSAGE in self.args[:-1]:
            raise ValueError("Arg.OPTIONAL_MESSAGE must be the last argument")


class _Refused(Exception):
    """An argument the client got wrong; carries the reply."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def dispatch(
    table: Mapping[str, Command],
    state: object,
    verb: str,
    rest: str,
    messages: Sequence[Message] = (),
) -> Reply | None:
    """Parse ``rest`` as ``table[verb]`` declares and call its handler with ``state``.

    ``messages`` is the mailbox that message numbers refer to. None when the table has
    no such verb (the loop then tells a wrong-state command from an unknown one).
    """
    command = table.get(verb)
    if command is None:
        return None
    try:
        values = _parse(command.args, verb, rest, messages)
    except _Refused as refused:
        return refused.reply
    return command.handler(state, *values)


def _parse(declared: tuple[Arg, ...], verb: str, rest: str, messages: Sequence[Message]) -> list[object]:
    if declared == (Arg.REST,):
        if not rest:
            raise _Refused(bad(f"Missing argument for {verb}."))
        return [rest]
    words = [word for word in rest.split(" ") if word]  # SP only: "1\xa0" is one (bad) word, not "1"
    required = sum(1 for kind in declared if kind is not Arg.OPTIONAL_MESSAGE)
    if len(words) < required:
        raise _Refused(bad(f"Missing argument for {verb}."))
    if len(words) > len(declared):
        raise _Refused(bad(f"Too many arguments for {verb}."))
    values: list[object] = [None] * len(declared)
    for i, (kind, word) in enumerate(zip(declared, words, strict=False)):  # plain arguments first
        if kind is Arg.LINES:
            values[i] = parse_count(word)
    for i, (kind, word) in enumerate(zip(declared, words, strict=False)):  # then message numbers
        if kind in (Arg.MESSAGE, Arg.OPTIONAL_MESSAGE):
            values[i] = get_msgnum(word, messages)
    return values


def parse_count(word: str) -> int:
    """A TOP line count: ASCII digits."""
    if not word.isascii() or not word.isdigit():
        raise _Refused(bad(f"Invalid number of lines: {clip(word)}"))
    return int(word)


def get_msgnum(word: str, messages: Sequence[Message]) -> Numbered:
    """Resolve a client message number, or refuse with a precise ``-ERR`` (a bad command)."""
    if not word.isascii() or not word.isdigit():
        raise _Refused(bad(f"Invalid message number: {clip(word)}"))
    msn = int(word) if len(word) <= _MAX_MSN_DIGITS else 0  # never parse an absurdly long number
    if not 0 < msn <= len(messages):
        raise _Refused(bad(f"There's no message {clip(word)}."))
    message = messages[msn - 1]
    if message.deleted:
        raise _Refused(bad(f"Message {msn} is deleted."))
    return Numbered(msn, message)


def clip(text: str, limit: int = 40) -> str:
    """Client text echoed in a reply: printable, short."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


def capabilities(*, logged_in: bool) -> list[str]:
    """The CAPA list (RFC 2449): exactly what works; IMPLEMENTATION only after login."""
    caps = ["TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if logged_in:
        caps.append(f"IMPLEMENTATION tpops-{__version__}")
    return caps
