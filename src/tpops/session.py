"""One POP3 session: the RFC 1939 state machine over a Transport, the same in daemon and inetd mode.

The loop reads a command line, looks the verb up in the current state's table
(:mod:`tpops.commands`), checks the argument count, calls the handler and writes the
:class:`~tpops.commands.Reply` it returns. Only this loop writes to the client,
counts bad commands, applies the ``$error_interval`` delay after a failed login and
enforces ``$command_timeout`` / ``$connection_keep_time``. Mailbox changes happen in
UPDATE only (after QUIT); any other end of the session deletes nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tpops import logs
from tpops.auth.base import Authenticator, AuthUnavailable, MailboxInUse, MailboxLock, MailUser
from tpops.commands import ALL_VERBS, COMMANDS, Reply, State, bad, err, ok
from tpops.config import Config
from tpops.mailbox.maildir import Maildir
from tpops.privileges import Refused, maildir_root
from tpops.protocol import (
    LINE_TOO_LONG,
    ConnectionLost,
    Interrupted,
    LineReader,
    LineTooLong,
    ReplyWriter,
    Timeout,
    Transport,
)

log = logs.get("session")

#: Commands whose arguments are secrets: masked in the --debug protocol trace.
_SECRET_ARGS = {"PASS": 0, "APOP": 1, "AUTH": 1}


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
    """One client connection from greeting to close.

    ``serve_as(user)`` is called after a successful login and before the Maildir is
    opened: it switches to the mailbox owner (or refuses with
    :class:`tpops.privileges.Refused`). ``on_login(text)`` lets the worker update
    its process title.
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
    ) -> None:
        self.transport = transport
        self.peer = peer
        self.config = config
        self.authenticator = authenticator
        self.serve_as = serve_as
        self.on_login = on_login
        self.reader = LineReader(transport)
        self.writer = ReplyWriter(transport, float(config.command_timeout))
        self.log = log
        self.state = State.AUTHORIZATION
        self.apop_timestamp = timestamp if authenticator.supports_apop else None
        self.pending_user: str | None = None
        self.attempted_login: str | None = None
        self.user: MailUser | None = None
        self.mailbox: Maildir = None  # type: ignore[assignment]  # set at login
        self.lock: MailboxLock | None = None
        self.auth_failures = 0
        self.bad_commands = 0
        self.dropped_privileges = False
        self.record = SessionRecord(peer, time.time(), 0.0, None, False)
        started = time.monotonic()
        self.connection_deadline = started + config.connection_keep_time

    # -- helpers used by command handlers ---------------------------------

    @property
    def login_name(self) -> str:
        return logs.escape(self.user.login if self.user else (self.attempted_login or ""))

    def mailbox_totals(self) -> tuple[int, int]:
        """(messages, octets) not marked deleted."""
        count = octets = 0
        for msg in self.mailbox.messages:
            if not msg.deleted:
                count += 1
                octets += msg.octets
        return count, octets

    def log_in(self, login: str, check: Callable[[Authenticator], MailUser | None]) -> Reply:
        """Run a credentials check (PASS or APOP) and, if it passes, open the mailbox."""
        self.attempted_login = login
        try:
            user = check(self.authenticator)
        except AuthUnavailable as exc:
            log.error(
                "authentication backend %s failed for %s from %s: %s",
                self.authenticator.name, logs.escape(login), self.peer, exc,
            )
            return err("Temporary authentication failure, try again later.", "SYS/TEMP")
        if user is None:
            self.auth_failures += 1
            log.warning("authentication failed: %s from %s", logs.escape(login), self.peer)
            last = self.auth_failures >= self.config.max_auth_failures
            return err("Authentication failed.", "AUTH", auth_failed=True, close=last)
        return self._open_mailbox(user)

    def _open_mailbox(self, user: MailUser) -> Reply:
        name = logs.escape(user.login)
        try:
            lock = self.authenticator.lock(user)
        except MailboxInUse:
            log.warning("cannot lock for %s from %s: mailbox in use", name, self.peer)
            return err("Mailbox is locked by another POP3 session.", "IN-USE")
        except (AuthUnavailable, OSError) as exc:
            log.error("cannot lock for %s from %s: %s", name, self.peer, exc)
            return err("Cannot lock the mailbox, try again later.", "SYS/TEMP")
        try:
            if self.serve_as is not None:
                self.dropped_privileges = self.serve_as(user)
            mailbox = Maildir.open(
                maildir_root(self.serve_as, user),
                maildir_extended=self.config.maildir_extended,
                maildir_use_filesize=self.config.maildir_use_filesize,
            )
        except Refused as exc:
            lock.release()
            log.error("refusing to serve %s from %s: %s", name, self.peer, exc)
            return err("This mailbox cannot be served.", "SYS/PERM", close=self.dropped_privileges or exc.final)
        except OSError as exc:
            lock.release()
            log.error("cannot open the mailbox of %s (%s): %s", name, logs.escape(user.maildir), exc)
            return err("Cannot open the mailbox, try again later.", "SYS/TEMP", close=self.dropped_privileges)
        self.lock = lock
        self.user = user
        self.mailbox = mailbox
        self.state = State.TRANSACTION
        count, octets = self.mailbox_totals()
        self.record.login = user.login
        self.record.logged_in = True
        self.record.start_msgs = self.record.end_msgs = count
        self.record.start_octets = self.record.end_octets = octets
        log.info("login: %s has %d messages (%d octets) from %s", name, count, octets, self.peer)
        if self.on_login:
            self.on_login(f"{user.login}@{self.peer}")
        return ok(f"Logged in, {count} messages ({octets} octets).")

    def update(self) -> Reply:
        """QUIT in TRANSACTION: the UPDATE state removes what DELE marked."""
        self.state = State.UPDATE
        result = self.mailbox.commit()
        if self.lock is not None:  # before the reply: a client may reconnect the moment it reads it
            self.lock.release()
            self.lock = None
        count, octets = self.mailbox_totals()
        self.record.end_msgs, self.record.end_octets = count, octets
        log.info(
            "logout: %s deleted %d messages (%d octets), %d messages (%d octets) left",
            self.login_name, result.deleted, result.deleted_octets, count, octets,
        )
        if result.failures:
            for failure in result.failures:
                log.error("UPDATE for %s: %s", self.login_name, failure)
            return err("Some deleted messages could not be removed.", "SYS/TEMP", close=True)
        return ok(f"Bye, {result.deleted} messages deleted, {count} left.", close=True)

    # -- the loop ----------------------------------------------------------

    def run(self) -> SessionRecord:
        """Serve the connection until QUIT, a limit, a stop request or the client leaves."""
        log.info("connect from %s", self.peer)
        reason = "quit"
        try:
            greeting = "tpops ready."
            if self.apop_timestamp:
                greeting += " " + self.apop_timestamp
            self._write(ok(greeting))
            while True:
                if not self.reader.has_pending_line():
                    self.writer.flush()
                line = self.reader.read_line(self._deadline())
                reply = self._execute(line)
                self._write(reply)
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
            log.exception("internal error in the session of %s from %s", self.login_name or "()", self.peer)
            self._farewell(err("Internal server error.", "SYS/TEMP"))
        finally:
            if self.lock is not None:
                self.lock.release()
            self.record.end = time.time()
            if not self.record.logged_in:
                self.record.login = self.attempted_login
            self.record.dropped_privileges = self.dropped_privileges
            if self.state is State.TRANSACTION:
                log.info("%s disconnected without QUIT (%s): nothing deleted", self.login_name, reason)
            log.info("disconnect from %s (%s)", self.peer, reason)
        return self.record

    def _deadline(self) -> float:
        return min(time.monotonic() + self.config.command_timeout, self.connection_deadline)

    def _execute(self, line: bytes | LineTooLong) -> Reply:
        reply = self._dispatch(line)
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
        if line is LINE_TOO_LONG:
            return bad("Command line too long.")
        assert isinstance(line, bytes)
        text = line.decode("utf-8", "surrogateescape")
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        if self.config.debug:
            log.debug("C: %s", logs.escape(_mask(verb, rest)))
        command = COMMANDS[self.state].get(verb)
        if command is None:
            if verb in ALL_VERBS:
                return bad(f"{verb} is not valid in the {self.state.value} state.")
            return bad("Unknown command.")
        if command.max_args is None:
            args = [rest] if rest else []
        else:
            args = rest.split()
        if len(args) < command.min_args:
            return bad(f"Missing argument for {verb}.")
        if command.max_args is not None and len(args) > command.max_args:
            return bad(f"Too many arguments for {verb}.")
        return command.handler(self, args)

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
