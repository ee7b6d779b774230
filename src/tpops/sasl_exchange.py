"""POP3 AUTH (RFC 5034): which SASL mechanisms a connection offers, and the exchange that runs one.

:func:`offered` is the mechanism list of one connection (CAPA's ``SASL`` line and a
bare ``AUTH``): PLAIN and LOGIN only where a password may cross the connection
(``$disable_plaintext_auth`` off, TLS, or loopback), CRAM-MD5 only when the backend
has clear-text secrets, SCRAM-SHA-256 when it has those or stored SCRAM credentials,
SCRAM-SHA-256-PLUS only on TLS with channel-binding data (:func:`tpops.sasl.mechanisms_for`);
and of those only the ones ``$sasl_mechanisms`` names (by default all but CRAM-MD5:
clients that see CRAM-MD5 choose it, and it fails for every user with a hashed password).

:func:`begin` answers ``AUTH mechanism [initial-response]``; a challenge is a
continuation (``+ base64``) whose reply carries a :class:`SaslExchange`, so the session
loop hands it the client's next raw line (up to :data:`tpops.sasl.MAX_RESPONSE_LINE`
octets). The exchange owns what RFC 5034 gives the server to decide: ``*`` cancels
(``-ERR``, not a failed login), a line that is not base64 or is too long ends the
exchange as a bad command (as Dovecot, no login penalty). The outcome of a mechanism
goes through the state's ``log_in(login, check)`` (:meth:`tpops.authorization.Authorization.log_in`),
exactly as PASS does: a failure counts towards ``$max_auth_failures`` and pays
``$error_interval`` and the address's penalty, a success locks and opens the Maildir.
This module does not import the AUTHORIZATION state; the state passes ``log_in`` in.
"""

from __future__ import annotations

from collections.abc import Callable

from tpops import logs, sasl
from tpops.auth.base import Authenticator, AuthUnavailable, MailUser
from tpops.config import Config
from tpops.connection import Connection
from tpops.protocol import LineTooLong
from tpops.reply import Reply, bad, err, more, ok

log = logs.get("session")

#: ``log_in(login, check)`` of the AUTHORIZATION state: runs ``check`` and logs in on success.
LogIn = Callable[[str, Callable[[Authenticator], MailUser | None]], Reply]

#: Dovecot's wording (issue 9): a mechanism that sends the password, on a non-secure connection.
PLAINTEXT_DISALLOWED = "Plaintext authentication disallowed on non-secure connections."
_SECRET_SENDING = ("PLAIN", "LOGIN")


def plaintext_allowed(config: Config, connection: Connection) -> bool:
    """Whether a password may cross this connection: ``$disable_plaintext_auth`` off, or it is secure."""
    return not config.plaintext_auth_disabled() or connection.secure


def offered(config: Config, authenticator: Authenticator, connection: Connection) -> tuple[str, ...]:
    """The mechanisms this connection offers, strongest first (CAPA ``SASL`` and bare ``AUTH``):
    those that can work here and that ``$sasl_mechanisms`` allows."""
    allowed = config.sasl_mechanism_names()
    possible = sasl.mechanisms_for(
        authenticator.sasl_caps,
        plaintext_allowed=plaintext_allowed(config, connection),
        channel_binding=connection.tls and connection.end_point is not None,
    )
    return tuple(m for m in possible if m in allowed)


def listing(config: Config, authenticator: Authenticator, connection: Connection) -> Reply:
    """A bare ``AUTH`` (Outlook sends it): the mechanisms, one per line, then ``.``."""
    return ok("Supported mechanisms follow", lines=offered(config, authenticator, connection))


def begin(
    words: str,
    *,
    config: Config,
    authenticator: Authenticator,
    connection: Connection,
    log_in: LogIn,
) -> Reply:
    """``AUTH mechanism [initial-response]``: start the mechanism, answer its first step."""
    name, _, initial_text = words.partition(" ")
    name = name.upper()
    if " " in initial_text:
        return bad("Too many arguments for AUTH.")
    mechanisms = offered(config, authenticator, connection)
    if name not in mechanisms:
        if name in _SECRET_SENDING and not plaintext_allowed(config, connection):
            log.info("AUTH %s refused from %s: plain text not allowed on this connection", name, connection.peer)
            return err(PLAINTEXT_DISALLOWED, "AUTH")
        return bad("Unsupported authentication mechanism.")
    initial: bytes | None = None
    if initial_text:
        try:
            initial = sasl.decode_initial_response(initial_text)
        except sasl.BadBase64:
            return bad("Invalid base64 data in initial response.")
    end_point = connection.end_point if connection.tls else None
    mechanism = sasl.make_mechanism(name, authenticator, hostname=config.hostname, end_point=end_point)
    exchange = SaslExchange(mechanism, log_in, connection.peer)
    return exchange.run(lambda: mechanism.start(initial))


class SaslExchange:
    """One AUTH in progress (:class:`tpops.reply.Exchange`): feeds client lines to a mechanism."""

    max_line = sasl.MAX_RESPONSE_LINE

    def __init__(self, mechanism: sasl.Mechanism, log_in: LogIn, peer: str) -> None:
        self._mechanism = mechanism
        self._log_in = log_in
        self._peer = peer

    def step(self, line: bytes | LineTooLong) -> Reply:
        """The client's answer to the last challenge: ``*``, base64, or too long."""
        if isinstance(line, LineTooLong):
            log.info("AUTH %s from %s: response longer than %d octets", self._mechanism.name, self._peer,
                     self.max_line)
            return bad("Response line too long.")
        if line == b"*":
            log.info("AUTH %s cancelled by the client from %s", self._mechanism.name, self._peer)
            return err("Authentication cancelled.")
        try:
            response = sasl.decode_response(line)
        except sasl.BadBase64:
            return bad("Invalid base64 data in continued response.")
        return self.run(lambda: self._mechanism.step(response))

    def run(self, step: Callable[[], sasl.Outcome]) -> Reply:
        """One mechanism step, and the reply for its outcome (backend trouble included)."""
        try:
            outcome = step()
        except AuthUnavailable as exc:
            failed = exc

            def unavailable(_backend: Authenticator) -> MailUser | None:
                raise failed

            return self._log_in("", unavailable)  # logged with the backend's message
        if isinstance(outcome, sasl.Challenge):
            return more(sasl.encode_challenge(outcome.data), self)
        if isinstance(outcome, sasl.Success):
            user = outcome.user
            return self._log_in(user.login, lambda _backend: user)
        log.info("AUTH %s failed from %s: %s", self._mechanism.name, self._peer, outcome.reason)
        return self._log_in(outcome.login or "", lambda _backend: None)
