"""The AUTHORIZATION state (RFC 1939 section 4): USER/PASS, APOP, and the login that ends it.

An :class:`Authorization` holds what this state remembers between commands (the
pending USER name, the last login attempted, the APOP timestamp of our greeting, the
failure count) and what a login needs (authenticator, configuration, the worker's
``serve_as`` privilege switch and ``on_login`` hook). A login runs, in this order:
credentials check -> mailbox lock -> ``serve_as`` (the switch to the mailbox owner) ->
``Maildir.open``; if all succeed, the reply carries the new
:class:`~tpops.transaction.Transaction` as the loop's next state. Every failure on the
way releases what was taken and answers with a precise ``-ERR``.

Next states fit here the same way. SASL AUTH (RFC 5034) runs in
:mod:`tpops.sasl_exchange`: the handler here starts it with
:meth:`Authorization.log_in` as the way out, so a mechanism's success or failure is
handled exactly as PASS's; a challenge is a :func:`tpops.reply.more` reply whose
exchange gets the client's next line. STLS (RFC 2595) answers
``ok(..., upgrade=...)``: the loop writes ``+OK``, discards the client's buffered
input and hands its transport to the owner's ``start_tls``, which runs the handshake;
the state then continues on the upgraded :class:`~tpops.connection.Connection`.
``$disable_plaintext_auth`` refuses USER/PASS/APOP (and AUTH PLAIN/LOGIN) on a
connection that is not :attr:`~tpops.connection.Connection.secure`. Log lines go to
the ``tpops.session`` logger, like the loop's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tpops import logs, sasl_exchange
from tpops.auth.base import Authenticator, AuthUnavailable, MailboxInUse, MailUser
from tpops.commands import Arg, Command, capabilities, dispatch
from tpops.config import Config
from tpops.connection import PLAIN, Connection
from tpops.mailbox.lock import MailboxLock
from tpops.mailbox.maildir import Maildir, MaildirRoot
from tpops.postlogin import HandOff, transferable
from tpops.privileges import Refused, check_identity, mailbox_owner, maildir_root
from tpops.protocol import Transport
from tpops.reply import Accounting, Reply, bad, err, ok
from tpops.transaction import Transaction

log = logs.get("session")

#: The owner's STLS handshake: the plain transport in, the TLS transport and the upgraded
#: connection out. Raises :class:`tpops.protocol.HandshakeFailed` (logged by it).
StartTLS = Callable[[Transport, Connection], tuple[Transport, Connection]]

#: Dovecot's wording, also for APOP (its digest is as good as a password to an eavesdropper
#: who can brute-force it offline).
PLAINTEXT_DISALLOWED = "Plaintext authentication disallowed on non-secure connections."


class Authorization:
    """The AUTHORIZATION state of one connection; see the module docstring.

    ``serve_as(user)`` is called after the lock is taken and before the Maildir is
    opened: it switches to the mailbox owner and says whether it did (or refuses with
    :class:`tpops.privileges.Refused`). ``on_login(text)`` lets the worker update its
    process title. ``timestamp`` is the APOP timestamp, used only when ``$apop`` is
    true and the backend supports APOP. ``start_tls`` (None: TLS not configured, or an
    inetd session) upgrades the connection after STLS. ``hand_off``: the worker can
    pass a logged-in session to a post-login process (:mod:`tpops.postlogin`).
    """

    name = "AUTHORIZATION"

    def __init__(
        self,
        config: Config,
        authenticator: Authenticator,
        peer: str,
        *,
        serve_as: Callable[[MailUser], bool] | None = None,
        on_login: Callable[[str], None] | None = None,
        timestamp: str | None = None,
        connection: Connection | None = None,
        start_tls: StartTLS | None = None,
        hand_off: bool = False,
    ) -> None:
        self.config = config
        self.start_tls = start_tls
        #: A login over a connection a post-login process can take (not TLS we terminate)
        #: ends in a :class:`~tpops.postlogin.HandOff` reply (root mode, see the module).
        self.hand_off = hand_off
        #: The client's address and protection (CAPA and $disable_plaintext_auth ask it).
        self.connection = connection if connection is not None else Connection(peer)
        self.authenticator = authenticator
        self.peer = peer
        self.serve_as = serve_as
        self.on_login = on_login
        self.apop_timestamp = timestamp if config.apop and authenticator.supports_apop else None
        self.pending_user: str | None = None
        self.attempted_login: str | None = None
        self.failures = 0
        self.dropped_privileges = False

    @property
    def log_name(self) -> str:
        return logs.escape(self.attempted_login or "")

    def greeting(self) -> Reply:
        """The server greeting, with the APOP timestamp when APOP can work."""
        text = "tpops ready."
        if self.apop_timestamp:
            text += " " + self.apop_timestamp
        return ok(text)

    def plaintext_allowed(self) -> bool:
        """Whether a password may be sent in clear here: ``$disable_plaintext_auth`` is off,
        or the connection is TLS or from this host."""
        return sasl_exchange.plaintext_allowed(self.config, self.connection)

    def stls_offered(self) -> bool:
        """STLS is advertised: TLS is configured and this connection is not TLS yet."""
        return self.start_tls is not None and not self.connection.tls

    def upgrade(self, transport: Transport) -> Transport:
        """After ``+OK`` to STLS: the handshake, then this state goes on over TLS.

        Anything learnt in the clear is forgotten (RFC 2595 section 4: a USER name
        given before is not carried into the TLS session).
        """
        assert self.start_tls is not None
        transport, self.connection = self.start_tls(transport, self.connection)
        self.pending_user = None
        return transport

    def execute(self, verb: str, rest: str) -> Reply | None:
        if verb == "AUTH" and not rest:  # the table's AUTH needs an argument; bare AUTH lists
            return sasl_exchange.listing(self.config, self.authenticator, self.connection)
        return dispatch(AUTHORIZATION_COMMANDS, self, verb, rest)

    def accounting(self) -> Accounting:
        return Accounting(self.attempted_login, dropped_privileges=self.dropped_privileges)

    def end(self, reason: str) -> None:
        """Nothing held before login."""

    def log_in(self, login: str, check: Callable[[Authenticator], MailUser | None]) -> Reply:
        """Run a credentials check (PASS, APOP, a SASL mechanism) and, if it passes, open the mailbox."""
        self.attempted_login = login
        try:
            user = check(self.authenticator)
        except AuthUnavailable as exc:
            # Backend trouble may hit only some logins (Passwd under --user cannot read
            # /etc/shadow for existing users): pay the same delay and count like a wrong
            # password, or the timing tells which logins exist. RFC 3206 [SYS/TEMP] stays.
            self.failures += 1
            log.error(
                "authentication backend %s failed for %s from %s: %s",
                self.authenticator.name, logs.escape(login), self.peer, exc,
            )
            last = self.failures >= self.config.max_auth_failures
            return err("Temporary authentication failure, try again later.", "SYS/TEMP", auth_failed=True, close=last)
        if user is None:
            self.failures += 1
            log.warning("authentication failed: %s from %s", logs.escape(login), self.peer)
            last = self.failures >= self.config.max_auth_failures
            return err("Authentication failed.", "AUTH", auth_failed=True, close=last)
        return self._open_mailbox(user)

    def _open_mailbox(self, user: MailUser) -> Reply:
        """Lock, then either the hand-off to a post-login process (root mode, see
        :mod:`tpops.postlogin`) or :meth:`serve_here`."""
        name = logs.escape(user.login)
        try:
            lock = self.authenticator.lock(user)
        except MailboxInUse:
            log.warning("cannot lock for %s from %s: mailbox in use", name, self.peer)
            return err("Mailbox is locked by another POP3 session.", "IN-USE")
        except (AuthUnavailable, OSError) as exc:
            log.error("cannot lock for %s from %s: %s", name, self.peer, exc)
            return err("Cannot lock the mailbox, try again later.", "SYS/TEMP")
        if self.hand_off and transferable(lock):
            return self._prepare_hand_off(user, lock)
        return self.serve_here(user, lock)

    def _prepare_hand_off(self, user: MailUser, lock: MailboxLock) -> Reply:
        """The owner's identity, decided and checked as root: the loop's hand-off reply."""
        try:
            identity, root = mailbox_owner(user)
            check_identity(identity, self.config.first_valid_uid, self.config.last_valid_uid)
        except Refused as exc:
            lock.release()
            log.error("refusing to serve %s from %s: %s", logs.escape(user.login), self.peer, exc)
            return err("This mailbox cannot be served.", "SYS/PERM")
        except OSError as exc:
            lock.release()
            log.error("cannot open the mailbox of %s (%s): %s", logs.escape(user.login), logs.escape(user.maildir), exc)
            return err("Cannot open the mailbox, try again later.", "SYS/TEMP")
        except BaseException:
            lock.release()
            raise
        return Reply(True, "", handoff=HandOff(user, identity, lock, root))

    def serve_here(self, user: MailUser, lock: MailboxLock, root: MaildirRoot | None = None) -> Reply:
        """``serve_as`` (the switch to the owner, in this process) -> ``Maildir.open``; the
        Transaction on success. ``root``: a Maildir opened for a hand-off that did not
        happen (closed here: ``serve_as`` decides again)."""
        if root is not None:
            root.close()
        try:
            if self.serve_as is not None:
                self.dropped_privileges = self.serve_as(user)
            opened = maildir_root(self.serve_as, user)
        except Refused as exc:
            lock.release()
            log.error("refusing to serve %s from %s: %s", logs.escape(user.login), self.peer, exc)
            return err("This mailbox cannot be served.", "SYS/PERM", close=self.dropped_privileges or exc.final)
        except OSError as exc:
            lock.release()
            log.error("cannot open the mailbox of %s (%s): %s", logs.escape(user.login), logs.escape(user.maildir), exc)
            return err("Cannot open the mailbox, try again later.", "SYS/TEMP", close=self.dropped_privileges)
        except BaseException:  # a bug or a stop request: the loop logs it; the lock must not outlive it
            lock.release()
            raise
        return open_transaction(self.config, user, lock, opened, self.peer, self.connection,
                                dropped_privileges=self.dropped_privileges, on_login=self.on_login)


def open_transaction(
    config: Config,
    user: MailUser,
    lock: MailboxLock,
    root: MaildirRoot | None,
    peer: str,
    connection: Connection,
    *,
    dropped_privileges: bool,
    on_login: Callable[[str], None] | None = None,
) -> Reply:
    """``Maildir.open`` on the opened directory (None: open ``user.maildir`` now), as the
    identity that serves it; the ``+OK`` with the new Transaction, or a ``-ERR`` with the
    lock released (closing the connection when this process changed its identity: it
    can serve no other login)."""
    name = logs.escape(user.login)
    try:
        if root is None:
            root = maildir_root(None, user)
        if root.exists and root.stat.st_uid != os.geteuid() and dropped_privileges:
            raise Refused(f"{user.maildir} belongs to uid {root.stat.st_uid}, not to uid {os.geteuid()}")
        mailbox = Maildir.open(
            root,
            maildir_extended=config.maildir_extended,
            maildir_use_filesize=config.maildir_use_filesize,
        )
    except Refused as exc:
        lock.release()
        log.error("refusing to serve %s from %s: %s", name, peer, exc)
        return err("This mailbox cannot be served.", "SYS/PERM", close=True)
    except OSError as exc:
        lock.release()
        log.error("cannot open the mailbox of %s (%s): %s", name, logs.escape(user.maildir), exc)
        return err("Cannot open the mailbox, try again later.", "SYS/TEMP", close=dropped_privileges)
    except BaseException:
        lock.release()
        raise
    transaction = Transaction(user, mailbox, lock, dropped_privileges=dropped_privileges)
    count, octets = transaction.start_totals
    log.info("login: %s has %d messages (%d octets) from %s (%s)", name, count, octets, peer, _protection(connection))
    if on_login:
        on_login(f"{user.login}@{peer}")
    return ok(f"Logged in, {count} messages ({octets} octets).", state=transaction)


def _protection(connection: Connection) -> str:
    """``TLS: TLSv1.3 TLS_AES_256_GCM_SHA384``, ``STLS: ...``, ``PROXY-TLS`` or ``plain``."""
    if connection.security == PLAIN or connection.tls_description is None:
        return connection.security
    return f"{connection.security}: {connection.tls_description}"


# ---------------------------------------------------------------------------
# Handlers


def cmd_user(auth: Authorization, name: str) -> Reply:
    """USER name: remember the name for PASS; tells nothing about whether it exists.

    The name is the rest of the line, as Dovecot takes it: a login is data, spaces included.
    """
    if not auth.plaintext_allowed():
        return err(PLAINTEXT_DISALLOWED, "AUTH")
    auth.pending_user = auth.attempted_login = name
    return ok("Send your password.")


def cmd_pass(auth: Authorization, password: str) -> Reply:
    """PASS secret: the whole rest of the line is the password (spaces allowed)."""
    if not auth.plaintext_allowed():
        return err(PLAINTEXT_DISALLOWED, "AUTH")
    if auth.pending_user is None:
        return bad("USER first.")
    login = auth.pending_user
    auth.pending_user = None
    secret = password.encode("utf-8", "surrogateescape")
    return auth.log_in(login, lambda backend: backend.authenticate(login, secret))


def cmd_apop(auth: Authorization, words: str) -> Reply:
    """APOP name digest (RFC 1939 section 7); the digest is the last word, the name may have spaces."""
    stamp = auth.apop_timestamp
    if stamp is None:
        return bad("APOP is not available.")
    if not auth.plaintext_allowed():
        return err(PLAINTEXT_DISALLOWED, "AUTH")
    login, _, digest = words.rpartition(" ")
    if not login or not digest:
        return bad("Missing argument for APOP.")
    return auth.log_in(login, lambda backend: backend.authenticate_apop(login, stamp, digest))


def cmd_auth(auth: Authorization, words: str) -> Reply:
    """AUTH mechanism [initial-response] (RFC 5034); a bare AUTH is answered by :meth:`Authorization.execute`."""
    auth.pending_user = None
    return sasl_exchange.begin(
        words, config=auth.config, authenticator=auth.authenticator, connection=auth.connection,
        log_in=auth.log_in,
    )


def cmd_capa(auth: Authorization) -> Reply:
    """CAPA (RFC 2449): exactly what works before login on this connection: USER only
    where plain-text passwords are allowed, STLS only while it is not TLS yet, and the
    SASL mechanisms this connection may use."""
    caps = capabilities(logged_in=False)
    if not auth.plaintext_allowed():
        caps.remove("USER")
    if auth.stls_offered():
        caps.append("STLS")
    mechanisms = sasl_exchange.offered(auth.config, auth.authenticator, auth.connection)
    if mechanisms:
        caps.append("SASL " + " ".join(mechanisms))
    return ok("Capability list follows", lines=caps)


def cmd_stls(auth: Authorization) -> Reply:
    """STLS (RFC 2595): ``+OK``, then the loop discards buffered input and upgrades."""
    if auth.connection.tls:
        return err("Command not permitted when TLS active")  # Dovecot's wording
    if auth.start_tls is None:
        return bad("TLS is not available on this server.")
    return ok("Begin TLS negotiation.", upgrade=auth.upgrade)


def cmd_quit(auth: Authorization) -> Reply:
    """QUIT before login: nothing to update."""
    return ok("Bye.", close=True)


AUTHORIZATION_COMMANDS: dict[str, Command] = {
    "USER": Command(cmd_user, (Arg.REST,)),
    "PASS": Command(cmd_pass, (Arg.REST,)),
    "APOP": Command(cmd_apop, (Arg.REST,)),
    "AUTH": Command(cmd_auth, (Arg.REST,)),
    "CAPA": Command(cmd_capa),
    "STLS": Command(cmd_stls),
    "QUIT": Command(cmd_quit),
}
