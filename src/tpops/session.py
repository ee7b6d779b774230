"""One POP3 session: the loop that drives a protocol state object over a Transport, in daemon and inetd mode.

The loop reads a line, hands it to the current state object (:class:`~tpops.reply.State`:
first :class:`~tpops.authorization.Authorization`, after a login the
:class:`~tpops.transaction.Transaction`), and writes the :class:`~tpops.reply.Reply` it
returns. Only this loop writes to the client, counts bad commands, applies the
``$error_interval`` delay after a failed login, enforces ``$command_timeout`` /
``$connection_keep_time`` and keeps the :class:`SessionRecord` for the access log. The
states own everything else: the login, the mailbox, the lock, UPDATE. Mailbox changes
happen in UPDATE only (after QUIT); any other end of the session deletes nothing.

What a reply may ask of the loop (see :mod:`tpops.reply`): ``state`` switches the
state object (before the reply is written, so a lost connection still ends the new
state); ``exchange`` routes the next raw client line, up to ``exchange.max_line``
octets, to that exchange instead of the command table until a reply without one ends it
(SASL AUTH); ``upgrade`` makes the loop flush, discard any buffered client input and
continue on ``upgrade(transport)`` (STLS). New states and exchanges plug in through
these fields; this module imports the state modules, never the other way round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tpops import logs
from tpops.auth.base import Authenticator, MailUser
from tpops.authorization import AUTHORIZATION_COMMANDS, Authorization
from tpops.config import Config
from tpops.protocol import (
    LINE_TOO_LONG,
    MAX_COMMAND_OCTETS,
    ConnectionLost,
    Interrupted,
    LineReader,
    LineTooLong,
    ReplyWriter,
    Timeout,
    Transport,
)
from tpops.reply import Exchange, Reply, State, bad, err
from tpops.transaction import TRANSACTION_COMMANDS

log = logs.get("session")

#: Commands whose arguments are secrets: masked in the --debug protocol trace.
_SECRET_ARGS = {"PASS": 0, "APOP": 1, "AUTH": 1}

#: Every verb known in some state: a known verb in the wrong state gets a precise -ERR.
ALL_VERBS = frozenset(AUTHORIZATION_COMMANDS) | frozenset(TRANSACTION_COMMANDS)


class SessionObserver(Protocol):
    """What a session reports as it goes (``tpops --status`` and metrics: :mod:`tpops.status`)."""

    def command(self, verb: str, state: str) -> None:
        """Before the state ``state`` (its name) executes ``verb``."""

    def replied(self, verb: str, reply: Reply) -> None:
        """After it answered ``verb`` with ``reply`` (before the loop writes it)."""


@dataclass(slots=True)
class SessionRecord:
    """What the access log and the worker need to know about a finished session."""

    peer: str
    start: float
    end: float
    login: str | None
    logged_in: bool
    start_msgs: int = 0
    start_octets: int = 0
    end_msgs: int = 0
    end_octets: int = 0
    dropped_privileges: bool = False

    def access_log_line(self) -> str:
        """The seed's format: ``IP START END LOGIN s_msgs s_octets e_msgs e_octets``."""
        name = logs.escape(self.login or "").replace(" ", "\\x20")  # LOGIN is one field
        if self.logged_in:
            login = name
        elif self.login is None:
            login = "()"
        else:
            login = f"({name})"
        fmt = "%Y/%m/%d %H:%M:%S"
        return (
            f"{self.peer} {time.strftime(fmt, time.localtime(self.start))} "
            f"{time.strftime(fmt, time.localtime(self.end))} {login} "
            f"{self.start_msgs} {self.start_octets} {self.end_msgs} {self.end_octets}\n"
        )


class Session:
    """One client connection from greeting to close: the loop around a protocol state object.

    The arguments after ``authenticator`` are handed to the first state,
    :class:`~tpops.authorization.Authorization` (see it for ``serve_as`` and ``on_login``),
    except ``observer``, which hears of every command and its reply.
    """

    def __init__(
        self,
        transport: Transport,
        peer: str,
        config: Config,
        authenticator: Authenticator,
        *,
        serve_as: Callable[[MailUser], bool] | None = None,
        on_login: Callable[[str], None] | None = None,
        timestamp: str | None = None,
        observer: SessionObserver | None = None,
    ) -> None:
        self.observer = observer
        self.transport = transport
        self.peer = peer
        self.config = config
        self.reader = LineReader(transport)
        self.writer = ReplyWriter(transport, float(config.command_timeout))
        self.authorization = Authorization(
            config, authenticator, peer, serve_as=serve_as, on_login=on_login, timestamp=timestamp
        )
        self.state: State = self.authorization
        self.exchange: Exchange | None = None
        self.bad_commands = 0
        self.record = SessionRecord(peer, time.time(), 0.0, None, False)
        self.connection_deadline = time.monotonic() + config.connection_keep_time

    def run(self) -> SessionRecord:
        """Serve the connection until QUIT, a limit, a stop request or the client leaves."""
        log.info("connect from %s", self.peer)
        reason = "quit"
        try:
            self._write(self.authorization.greeting())
            while True:
                if not self.reader.has_pending_line():
                    self.writer.flush()
                limit = self.exchange.max_line if self.exchange is not None else MAX_COMMAND_OCTETS
                line = self.reader.read_line(self._deadline(), limit)
                reply = self._execute(line)
                self._write(reply)
                if reply.upgrade is not None:
                    self._upgrade(reply.upgrade)
                if reply.close:
                    break
            self.writer.flush()
        except Timeout:
            if time.monotonic() >= self.connection_deadline:
                reason = "connection time limit"
                self._farewell(err("Connection time limit reached."))
            else:
                reason = "idle timeout"
                self._farewell(err("Disconnected for inactivity."))
        except Interrupted:
            reason = "server shutdown"
            self._farewell(err("Server shutting down.", "SYS/TEMP"))
        except ConnectionLost:
            reason = "client disconnected"
        except Exception:
            reason = "internal error"
            log.exception("internal error in the session of %s from %s", self.state.log_name or "()", self.peer)
            self._farewell(err("Internal server error.", "SYS/TEMP"))
        finally:
            self.state.end(reason)
            self.record.end = time.time()
            facts = self.state.accounting()
            self.record.login = facts.login
            self.record.logged_in = facts.logged_in
            self.record.start_msgs, self.record.start_octets = facts.start_msgs, facts.start_octets
            self.record.end_msgs, self.record.end_octets = facts.end_msgs, facts.end_octets
            self.record.dropped_privileges = facts.dropped_privileges
            log.info("disconnect from %s (%s)", self.peer, reason)
        return self.record

    def _deadline(self) -> float:
        return min(time.monotonic() + self.config.command_timeout, self.connection_deadline)

    def _execute(self, line: bytes | LineTooLong) -> Reply:
        """One line in, one reply out; the reply's state and exchange take effect at once."""
        reply = self._dispatch(line)
        if reply.state is not None:  # before writing: a lost connection still ends the new state
            self.state = reply.state
        self.exchange = reply.exchange
        if reply.auth_failed:
            self.writer.flush()
            self.transport.pause(self.config.error_interval)
        if reply.bad:
            self.bad_commands += 1
            if self.bad_commands >= self.config.max_bad_commands:
                log.warning("too many bad commands from %s, disconnecting", self.peer)
                return err("Too many bad commands.", close=True)
        else:
            self.bad_commands = 0
        return reply

    def _dispatch(self, line: bytes | LineTooLong) -> Reply:
        if self.exchange is not None:  # the line belongs to the exchange, not the command table
            if self.config.debug:
                log.debug("C: ****")
            return self.exchange.step(line)
        if line is LINE_TOO_LONG:
            return bad("Command line too long.")
        assert isinstance(line, bytes)
        text = line.decode("utf-8", "surrogateescape")
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        if self.config.debug:
            log.debug("C: %s", logs.escape(_mask(verb, rest)))
        if self.observer is not None:
            self.observer.command(verb, self.state.name)
        reply = self.state.execute(verb, rest)
        if self.observer is not None and reply is not None:
            self.observer.replied(verb, reply)
        if reply is not None:
            return reply
        if verb in ALL_VERBS:
            return bad(f"{verb} is not valid in the {self.state.name} state.")
        return bad("Unknown command.")

    def _write(self, reply: Reply) -> None:
        if self.config.debug:
            log.debug("S: %s", logs.escape(reply.status_line()))
        self.writer.line(reply.status_line())
        if reply.lines is not None:
            self.writer.lines(reply.lines)
            self.writer.line(".")
        elif reply.data is not None:
            self.writer.raw(reply.data)
            self.writer.line(".")

    def _upgrade(self, upgrade: Callable[[Transport], Transport]) -> None:
        """Flush, drop buffered client input, and continue on ``upgrade(transport)`` (STLS)."""
        self.writer.flush()
        self.transport = upgrade(self.transport)
        self.reader = LineReader(self.transport)  # a fresh buffer: pipelined plaintext is discarded
        self.writer = ReplyWriter(self.transport, float(self.config.command_timeout))

    def _farewell(self, reply: Reply) -> None:
        """Best-effort last words; the connection is going away regardless."""
        try:
            data = bytes(self.writer.buffer) + reply.status_line().encode() + b"\r\n"
            self.writer.buffer.clear()
            self.transport.should_stop = lambda: False
            self.transport.send(data, 1.0)
        except (ConnectionLost, Timeout, Interrupted, OSError):
            pass


def _mask(verb: str, rest: str) -> str:
    """The command line for the debug trace, with secrets replaced by ``****``."""
    position = _SECRET_ARGS.get(verb)
    if position is None:
        return f"{verb} {rest}".rstrip()
    words = rest.split(" ")
    if position < len(words):
        words = words[:position] + ["****"]
    return f"{verb} {' '.join(words)}".rstrip()


def make_timestamp(hostname: str, counter: int) -> str:
    """An APOP timestamp (RFC 1939 section 7), unique per connection and unpredictable."""
    return f"<{os.getpid()}.{counter}.{int(time.time())}.{os.urandom(4).hex()}@{hostname}>"
