"""The TRANSACTION state (RFC 1939 section 5) and UPDATE: a logged-in user's mailbox, its commands.

A :class:`Transaction` exists only once a login has succeeded, so its user, its
Maildir snapshot and its mailbox lock are never None. Its handlers take the
Transaction and their declared arguments (:mod:`tpops.commands`); they only mark
messages (DELE, RSET). The mailbox changes in UPDATE only (:meth:`Transaction.update`,
after QUIT); any other end of the session (:meth:`Transaction.end`) releases the lock
and deletes nothing. Log lines go to the ``tpops.session`` logger, like the loop's:
one session's story under one name.
"""

from __future__ import annotations

from tpops import logs
from tpops.auth.base import MailboxLock, MailUser
from tpops.commands import Arg, Command, Numbered, capabilities, dispatch
from tpops.mailbox.encode import wire_message
from tpops.mailbox.maildir import Maildir, MessageGone
from tpops.reply import Accounting, Reply, err, ok

log = logs.get("session")


class Transaction:
    """A logged-in session's state: who, which snapshot, which lock; and its totals."""

    name = "TRANSACTION"

    def __init__(self, user: MailUser, mailbox: Maildir, lock: MailboxLock, *, dropped_privileges: bool) -> None:
        self.user = user
        self.mailbox = mailbox
        self.lock = lock
        self.dropped_privileges = dropped_privileges
        #: True once QUIT entered UPDATE: the session ended with QUIT, whatever follows.
        self.updating = False
        self.start_totals = self.end_totals = self.totals()

    @property
    def log_name(self) -> str:
        return logs.escape(self.user.login)

    def totals(self) -> tuple[int, int]:
        """(messages, octets) not marked deleted."""
        count = octets = 0
        for msg in self.mailbox.messages:
            if not msg.deleted:
                count += 1
                octets += msg.octets
        return count, octets

    def execute(self, verb: str, rest: str) -> Reply | None:
        return dispatch(TRANSACTION_COMMANDS, self, verb, rest, self.mailbox.messages)

    def update(self) -> Reply:
        """QUIT: the UPDATE state removes what DELE marked, then the lock goes.

        Only while the lock is still ours: a MySQL ``GET_LOCK`` vanishes with its
        connection (server restart, ``wait_timeout``), and another session may hold the
        mailbox by now. Then nothing is deleted and the client is told to try again.
        """
        self.updating = True
        if not self.lock.still_held():
            self.lock.release()
            log.error("UPDATE for %s refused: the mailbox lock was lost during the session "
                      "(the lock's database connection dropped); nothing deleted", self.log_name)
            self.end_totals = self.start_totals
            return err("Mailbox lock lost, nothing deleted; try again.", "SYS/TEMP", close=True)
        result = self.mailbox.commit()
        self.lock.release()  # before the reply: a client may reconnect the moment it reads it
        count, octets = self.end_totals = self.totals()
        log.info(
            "logout: %s deleted %d messages (%d octets), %d messages (%d octets) left",
            self.log_name, result.deleted, result.deleted_octets, count, octets,
        )
        if result.failures:
            for failure in result.failures:
                log.error("UPDATE for %s: %s", self.log_name, failure)
            return err("Some deleted messages could not be removed.", "SYS/TEMP", close=True)
        return ok(f"Bye, {result.deleted} messages deleted, {count} left.", close=True)

    def accounting(self) -> Accounting:
        (start_msgs, start_octets), (end_msgs, end_octets) = self.start_totals, self.end_totals
        return Accounting(
            self.user.login, True, start_msgs, start_octets, end_msgs, end_octets, self.dropped_privileges
        )

    def end(self, reason: str) -> None:
        """Release the lock (idempotent); without QUIT nothing was deleted, and the log says so."""
        self.lock.release()
        if not self.updating:
            log.info("%s disconnected without QUIT (%s): nothing deleted", self.log_name, reason)


# ---------------------------------------------------------------------------
# Handlers


def cmd_stat(tx: Transaction) -> Reply:
    count, octets = tx.totals()
    return ok(f"{count} {octets}")


def cmd_list(tx: Transaction, one: Numbered | None) -> Reply:
    """LIST [n]: the size of one message, or of every message not deleted."""
    if one is not None:
        return ok(f"{one.msn} {one.message.octets}")
    count, octets = tx.totals()
    lines = (f"{msn} {m.octets}" for msn, m in enumerate(tx.mailbox.messages, 1) if not m.deleted)
    return ok(f"{count} messages ({octets} octets)", lines=lines)


def cmd_uidl(tx: Transaction, one: Numbered | None) -> Reply:
    """UIDL [n]: the unique-id of one message, or of every message not deleted."""
    if one is not None:
        return ok(f"{one.msn} {one.message.uid}")
    lines = (f"{msn} {m.uid}" for msn, m in enumerate(tx.mailbox.messages, 1) if not m.deleted)
    return ok("Unique-ID list follows", lines=lines)


def cmd_retr(tx: Transaction, which: Numbered) -> Reply:
    """RETR n: the whole message, streamed."""
    return _send_message(tx, which, None, f"{which.message.octets} octets")


def cmd_top(tx: Transaction, which: Numbered, body_lines: int) -> Reply:
    """TOP n k: the header, the blank line and k body lines."""
    return _send_message(tx, which, body_lines, "Top of message follows")


def _send_message(tx: Transaction, which: Numbered, body_lines: int | None, text: str) -> Reply:
    msn, msg = which.msn, which.message
    try:
        fd = tx.mailbox.open_message_fd(msg)
    except MessageGone:
        log.info("message %d (%s) of %s vanished during the session", msn, msg.uid, tx.log_name)
        return err(f"Message {msn} no longer exists.")
    except OSError as exc:
        log.error("cannot open message %d of %s: %s", msn, tx.log_name, exc.strerror)
        return err(f"Cannot read message {msn}.", "SYS/TEMP")
    try:
        data = wire_message(fd, body_lines, msg.octets if msg.verbatim else None)
    except OSError as exc:
        log.error("cannot read message %d of %s: %s", msn, tx.log_name, exc.strerror)
        return err(f"Cannot read message {msn}.", "SYS/TEMP")
    return ok(text, data=data)


def cmd_dele(tx: Transaction, which: Numbered) -> Reply:
    """DELE n only marks; the file goes at QUIT (UPDATE)."""
    which.message.deleted = True
    return ok(f"Message {which.msn} deleted.")


def cmd_noop(tx: Transaction) -> Reply:
    return ok("")


def cmd_rset(tx: Transaction) -> Reply:
    """RSET: unmark every message DELE marked."""
    for msg in tx.mailbox.messages:
        msg.deleted = False
    count, octets = tx.totals()
    return ok(f"{count} messages ({octets} octets)")


def cmd_capa(tx: Transaction) -> Reply:
    """CAPA (RFC 2449), with IMPLEMENTATION now that the client is logged in."""
    return ok("Capability list follows", lines=capabilities(logged_in=True))


def cmd_quit(tx: Transaction) -> Reply:
    """QUIT: enter UPDATE and remove the messages marked deleted."""
    return tx.update()


TRANSACTION_COMMANDS: dict[str, Command] = {
    "STAT": Command(cmd_stat),
    "LIST": Command(cmd_list, (Arg.OPTIONAL_MESSAGE,)),
    "RETR": Command(cmd_retr, (Arg.MESSAGE,)),
    "DELE": Command(cmd_dele, (Arg.MESSAGE,)),
    "NOOP": Command(cmd_noop),
    "RSET": Command(cmd_rset),
    "TOP": Command(cmd_top, (Arg.MESSAGE, Arg.LINES)),
    "UIDL": Command(cmd_uidl, (Arg.OPTIONAL_MESSAGE,)),
    "CAPA": Command(cmd_capa),
    "QUIT": Command(cmd_quit),
}
