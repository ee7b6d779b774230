"""One POP3 session: the loop that drives a protocol state object over a Transport, in daemon and inetd mode.

The loop reads a line, hands it to the current state object (:class:`~tpops.reply.State`:
first :class:`~tpops.authorization.Authorization`, after a login the
:class:`~tpops.transaction.Transaction`), and writes the :class:`~tpops.reply.Reply` it
returns. Only this loop writes to the client, counts bad commands, applies the
``$error_interval`` delay after a failed login (plus a per-address penalty when the
owner passes one), enforces the time limits and keeps the
:class:`SessionRecord` for the access log. The states own everything else: the login,
the mailbox, the lock, UPDATE. Mailbox changes happen in UPDATE only (after QUIT); any
other end of the session deletes nothing.

Time limits: ``$command_timeout`` bounds each wait for the client (a read, or a write
that makes no progress). The hard deadline, ``$connection_keep_time`` from connect and,
until a login succeeds, ``$login_timeout``, bounds everything: reads, every write (a
client reading a big RETR at a trickle is cut at it) and buffered input (a pipelining
client, whose reads never block, is checked before each command). Writes block the
loop, so while replies cannot drain no further input is read or parsed.

Ending: :meth:`Session.run` returns the record; the owner logs it, then calls
:meth:`Session.finish`, which (whenever the server ended the connection: QUIT, a limit,
shutdown) shuts down the sending side and drains client input briefly before the owner
closes it: closing with unread pipelined input would reset the connection and lose the
last replies. The disconnect log line names the reason ("too many bad commands",
"login time limit", ...).

What a reply may ask of the loop (see :mod:`tpops.reply`): ``state`` switches the
state object (before the reply is written, so a lost connection still ends the new
state); ``exchange`` routes the next raw client line, up to ``exchange.max_line``
octets, to that exchange instead of the command table until a reply without one ends it
(SASL AUTH); ``upgrade`` makes the loop flush, discard any buffered client input and
continue on ``upgrade(transport)`` (STLS); ``handoff`` ends the loop here when the
owner's ``hand_off`` passed the session to a post-login process (root mode), which
resumes it (:meth:`Session.resume`). New states and exchanges plug in through
these fields; this module imports the state modules, never the other way round.
"""

from __future__ import annotations

import os
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tpops import logs
from tpops.auth.base import Authenticator, MailUser
from tpops.authorization import AUTHORIZATION_COMMANDS, Authorization, StartTLS
from tpops.config import Config
from tpops.connection import Connection
from tpops.postlogin import HandOff, Resume, lock_kind
from tpops.protocol import (
    LINE_TOO_LONG,
    MAX_COMMAND_OCTETS,
    ConnectionLost,
    HandshakeFailed,
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

#: Upper-cases a-z and nothing else: commands are ASCII (RFC 1939), never Unicode-folded.
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)

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


class FailurePenalty(Protocol):
    """The failed-login penalty of this session's client address, shared by all workers
    (Dovecot's auth penalty; :class:`tpops.limits.ClientLimits` in the pool).

    After a failed login (any failure path) the session pauses ``$error_interval`` plus
    ``penalty()`` (the object applies ``$max_auth_penalty``), then answers, and calls
    ``record_failure()``; a successful login calls ``record_success()``.
    """

    def penalty(self) -> float:
        """Seconds added to the pause after this client's next failed login."""
        ...

    def record_failure(self) -> None:
        """A login from this address failed."""
        ...

    def record_success(self) -> None:
        """A login from this address succeeded."""
        ...


class Session:
    """One client connection from greeting to close: the loop around a protocol state object.

    ``serve_as``, ``on_login`` and ``timestamp`` are handed to the first state,
    :class:`~tpops.authorization.Authorization` (see it). ``observer`` hears of every
    command and its reply. ``penalty``, when given, lengthens the pause after a failed
    login by the client address's shared penalty (:class:`FailurePenalty`). The
    transport's ``progress()`` heartbeat is also called after each command is handled
    (a slow backend check or UPDATE moves no data). ``connection`` describes the client
    and its protection; ``start_tls`` (TLS configured) makes STLS available. ``hand_off``
    (root mode's workers) takes a login's :class:`~tpops.postlogin.HandOff` to a
    post-login process and says whether it did; the loop then ends (``handed_off``) and
    the owner writes no access-log line: the post-login process, which continues this
    session with :meth:`resume` and ``run(first=...)``, does.
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
        penalty: FailurePenalty | None = None,
        connection: Connection | None = None,
        start_tls: StartTLS | None = None,
        hand_off: Callable[[HandOff, Resume], bool] | None = None,
    ) -> None:
        self.observer = observer
        self.hand_off = hand_off
        #: The rest of the session went to a post-login process: nothing more to do here.
        self.handed_off = False
        self.started = time.monotonic()
        self.command_started = self.started
        self.transport = transport
        self.peer = peer
        self.config = config
        self.penalty = penalty
        now = time.monotonic()
        self.connection_deadline = now + config.connection_keep_time
        #: AUTHORIZATION as a whole ends here ($login_timeout), however busy the client keeps it.
        self.login_deadline = now + config.login_timeout
        self.logged_in = False
        self.reader = LineReader(transport)
        self.writer = ReplyWriter(transport, float(config.command_timeout), self._hard_deadline())
        self.authorization = Authorization(
            config, authenticator, peer, serve_as=serve_as, on_login=on_login, timestamp=timestamp,
            connection=connection if connection is not None else Connection(peer), start_tls=start_tls,
            hand_off=hand_off is not None,
        )
        self.state: State = self.authorization
        self.exchange: Exchange | None = None
        self.bad_commands = 0
        #: Why the loop ends when a reply closes the connection ("quit" unless a limit says otherwise).
        self.close_reason = "quit"
        #: Why the session ended, as logged; set when :meth:`run` returns.
        self.reason = ""
        #: STLS's handshake is running: the client speaks TLS now, so no clear-text last words.
        self.upgrading = False
        self.record = SessionRecord(peer, time.time(), 0.0, None, False)

    @property
    def connection(self) -> Connection:
        """The client and its protection now (STLS upgrades it)."""
        return self.authorization.connection

    def resume(self, resume: Resume) -> None:
        """Continue, in a post-login process, the session a worker handed off: its
        connect time, its connection time limit and the input it had read ahead."""
        self.record.start = resume.start
        self.connection_deadline = resume.connection_deadline
        self.started = resume.session_started
        self.reader.buffer[:] = resume.pending
        self.reader.discarding = resume.discarding
        self.authorization.attempted_login = resume.user.login

    def run(self, first: Reply | None = None) -> SessionRecord:
        """Serve the connection until QUIT, a limit, a stop request or the client leaves.

        ``first``: a resumed session's first reply (the login's, from
        :func:`~tpops.authorization.open_transaction`) instead of the greeting.
        """
        if first is None:
            log.info("connect from %s", self.peer)
        reason = "quit"
        try:
            if first is None:
                self._write(self.authorization.greeting())
            else:
                first = self._apply(first)
                self._write(first)
                if first.close:
                    raise _Ended(self.close_reason)
            while True:
                if time.monotonic() >= self._hard_deadline():
                    raise Timeout  # a pipelining client never lets a read block: check here too
                if not self.reader.has_pending_line():
                    self.writer.flush()
                limit = self.exchange.max_line if self.exchange is not None else MAX_COMMAND_OCTETS
                line = self.reader.read_line(self._deadline(), limit)
                reply = self._execute(line)
                if self.handed_off:
                    reason = "handed off"
                    break
                self._write(reply)
                self.transport.progress()
                if reply.upgrade is not None:
                    self._upgrade(reply.upgrade)
                if reply.close:
                    reason = self.close_reason
                    break
            self.writer.flush()
        except _Ended as ended:
            reason = ended.reason
            self.writer.flush()
        except Timeout:
            now = time.monotonic()
            if not self.logged_in and now >= self.login_deadline:
                reason = "login time limit"
                log.warning("no login within %d seconds from %s, disconnecting", self.config.login_timeout, self.peer)
                self._farewell(err("Login time limit reached."))
            elif now >= self.connection_deadline:
                reason = "connection time limit"
                self._farewell(err("Connection time limit reached."))
            else:
                reason = "idle timeout"
                self._farewell(err("Disconnected for inactivity."))
        except Interrupted:
            reason = "server shutdown"
            self._farewell(err("Server shutting down.", "SYS/TEMP"))
        except HandshakeFailed:  # after STLS; the owner's start_tls logged why
            reason = "TLS handshake failed"
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
            if not self.handed_off:
                log.info("disconnect from %s (%s)", self.peer, reason)
            self.reason = reason
        return self.record

    def finish(self) -> None:
        """End the server's side of the connection cleanly; the owner closes it afterwards.

        Called by the owner after :meth:`run`, once it has written the access-log line,
        so a client that sees EOF sees a session that is over and accounted. When the
        server ended the connection, shut down the sending side and drain the client's
        input briefly (:meth:`~tpops.protocol.Transport.shut_down`): a close with
        unread pipelined input would reset the connection and lose the last replies.
        """
        if self.reason != "client disconnected":
            self.transport.shut_down(unread=bool(self.reader.buffer))

    def _hard_deadline(self) -> float:
        """When the connection must end whatever the client does: $connection_keep_time, and
        $login_timeout until a login succeeds. Bounds reads, writes and buffered input."""
        if self.logged_in:
            return self.connection_deadline
        return min(self.connection_deadline, self.login_deadline)

    def _deadline(self) -> float:
        """The deadline of the next read: $command_timeout of silence, or the hard deadline."""
        return min(time.monotonic() + self.config.command_timeout, self._hard_deadline())

    def _execute(self, line: bytes | LineTooLong) -> Reply:
        """One line in, one reply out; the reply's state and exchange take effect at once."""
        return self._apply(self._dispatch(line))

    def _apply(self, reply: Reply) -> Reply:
        """What a reply asks of the loop before it is written (see :mod:`tpops.reply`)."""
        if reply.state is not None:  # before writing: a lost connection still ends the new state
            self.state = reply.state
            if not self.logged_in and self.state.accounting().logged_in:
                self.logged_in = True  # $login_timeout no longer applies
                self.writer.deadline = self._hard_deadline()
                if self.penalty is not None:
                    self.penalty.record_success()
        self.exchange = reply.exchange
        if reply.auth_failed:
            self.writer.flush()
            self.transport.pause(self._failure_pause())
            if reply.close:
                self.close_reason = "too many failed logins"
        if reply.bad:
            self.bad_commands += 1
            if self.bad_commands >= self.config.max_bad_commands:
                log.warning("too many bad commands from %s, disconnecting", self.peer)
                self.close_reason = "too many bad commands"
                return err("Too many bad commands.", close=True)
        else:
            self.bad_commands = 0
        return reply

    def _failure_pause(self) -> float:
        """Seconds to wait before answering a failed login: ``$error_interval`` plus the
        address's penalty so far, which this failure then raises."""
        pause = float(self.config.error_interval)
        if self.penalty is not None:
            pause += max(self.penalty.penalty(), 0.0)
            self.penalty.record_failure()
        return pause

    def _dispatch(self, line: bytes | LineTooLong) -> Reply:
        if self.exchange is not None:  # the line belongs to the exchange, not the command table
            if self.config.debug:
                log.debug("C: ****")
            self.command_started = time.monotonic()
            return self._settle(self.exchange.step(line), "AUTH")
        if line is LINE_TOO_LONG:
            return bad("Command line too long.")
        assert isinstance(line, bytes)
        text = line.decode("utf-8", "surrogateescape")
        verb, _, rest = text.partition(" ")  # SP only (RFC 1939): a tab or NBSP is no separator
        verb = verb.translate(_ASCII_UPPER)  # ASCII folding only: "\u017ftat".upper() is "STAT"
        if self.config.debug:
            log.debug("C: %s", logs.escape(_mask(text, verb, rest)))
        if self.observer is not None:
            self.observer.command(verb, self.state.name)
        self.command_started = time.monotonic()
        reply = self.state.execute(verb, rest)
        if reply is not None:
            reply = self._settle(reply, verb)
        if self.observer is not None and reply is not None:
            self.observer.replied(verb, reply)
        if reply is not None:
            return reply
        if verb in ALL_VERBS:
            return bad(f"{verb} is not valid in the {self.state.name} state.")
        return bad("Unknown command.")

    def _settle(self, reply: Reply, verb: str) -> Reply:
        """A hand-off reply goes to the owner's ``hand_off``; when that did not take the
        session over, the login is served here. Any other reply is returned as is."""
        handoff = reply.handoff
        if handoff is None:
            return reply
        if self.hand_off is not None:
            self.writer.flush()  # replies to pipelined commands before the login go first
            resume = Resume(
                user=handoff.user, peer=self.peer, connection=self.connection, start=self.record.start,
                connection_deadline=self.connection_deadline,
                pending=bytes(self.reader.buffer), discarding=self.reader.discarding,
                verb=verb, command_started=self.command_started, session_started=self.started,
                lock_kind=lock_kind(handoff.lock), lock_path=getattr(handoff.lock, "path", ""),
                root_path=handoff.root.path if handoff.root is not None and handoff.root.exists else None,
                root_stat=handoff.root.stat if handoff.root is not None and handoff.root.exists else None,
            )
            if self.hand_off(handoff, resume):
                self.handed_off = True
                if self.penalty is not None:
                    self.penalty.record_success()
                return reply
        return self.authorization.serve_here(handoff.user, handoff.lock, handoff.root)

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
        self.upgrading = True
        self.transport = upgrade(self.transport)
        self.upgrading = False
        self.reader = LineReader(self.transport)  # a fresh buffer: pipelined plaintext is discarded
        self.writer = ReplyWriter(self.transport, float(self.config.command_timeout), self._hard_deadline())

    def _farewell(self, reply: Reply) -> None:
        """Best-effort last words, at most one second; the connection is going away regardless.

        Nothing is written after a send that failed part-way (the client may hold half a
        reply, a RETR body: our line would read as its data); the client sees the
        connection end instead. Nor during STLS's handshake (SIGTERM interrupts it): the
        client expects a TLS record there, and a clear-text line would only be noise.
        """
        if self.writer.broken or self.upgrading:
            return
        try:
            pending = [*self.writer.queued, self.writer.buffer]  # in the order they were written
            data = b"".join(pending) + reply.status_line().encode() + b"\r\n"
            self.writer.queued.clear()
            self.writer.buffer.clear()
            self.transport.should_stop = lambda: False
            self.transport.send(data, 1.0, time.monotonic() + 1.0)
        except (ConnectionLost, Timeout, Interrupted, OSError):
            pass


class _Ended(Exception):
    """A resumed session's first reply closed the connection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _mask(text: str, verb: str, rest: str) -> str:
    """The command line for the debug trace, with secrets replaced by ``****``.

    A well-formed ``PASS x`` / ``APOP name x`` / ``AUTH mech x`` keeps its
    non-secret words. Any other line that starts (after any whitespace, in any case,
    Unicode-folded to err on the safe side) with one of those verbs, such as
    ``PASS<TAB>secret``, ``pass\x0bsecret`` or ``PASSsecret``, keeps only the verb: the
    client meant a secret, and a malformed command must not put it in the log.
    """
    position = _SECRET_ARGS.get(verb)
    if position is not None:
        words = rest.split(" ")
        if position < len(words):
            words = [*words[:position], "****"]
        return f"{verb} {' '.join(words)}".rstrip()
    head = text.lstrip()[:4].upper()
    if head in _SECRET_ARGS:
        return f"{head} ****"
    return f"{verb} {rest}".rstrip()


def make_timestamp(hostname: str, counter: int) -> str:
    """An APOP timestamp (RFC 1939 section 7), unique per connection and unpredictable."""
    return f"<{os.getpid()}.{counter}.{int(time.time())}.{os.urandom(4).hex()}@{hostname}>"
