"""SASL server mechanisms for POP3 AUTH (RFC 5034): PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-256(-PLUS).

The mechanisms are small step objects that know nothing of sockets or sessions. The
AUTH loop in the session drives them:

    mech = make_mechanism(name, backend, hostname=..., end_point=...)
    outcome = mech.start(initial)            # bytes from decode_initial_response(), or None
    while isinstance(outcome, Challenge):
        send("+ " + encode(outcome.data))    # "+ " alone for an empty challenge
        line = read()                        # up to MAX_RESPONSE_LINE octets
        if line == "*": -ERR, the exchange is cancelled (RFC 5034 4); drop ``mech``
        outcome = mech.step(decode_response(line))   # BadBase64 -> -ERR, drop ``mech``
    Success(user)  -> lock the mailbox as after PASS, +OK
    Failure(reason) -> log ``reason`` (already escaped, never a secret), count a failed
                       login ($error_interval, $max_auth_failures), -ERR [AUTH] ...

The caller owns everything that is about the connection: whether AUTH is allowed in this
state, which mechanisms this connection offers (:func:`mechanisms_for`), the cancel
``*``, the line length, base64 errors, and :class:`~tpops.auth.AuthUnavailable`, which
the mechanisms let through unchanged (answer ``-ERR [SYS/TEMP]``). A mechanism object
serves one exchange and is thrown away afterwards.

RFC 5034 allows no data with the final ``+OK``; SCRAM's server-final message (the
server's proof) is therefore sent as one more ``+`` challenge, to which the client
answers an empty line, and only then does the mechanism return :class:`Success`. The
loop above needs no special case for it.

What the mechanisms need from the authenticator is :class:`SaslBackend`; which
mechanisms a backend can serve is :class:`BackendCaps`.

Logins and passwords: PLAIN (RFC 4616) and SCRAM (RFC 5802) usernames are prepared with
SASLprep (RFC 4013, :func:`saslprep`); LOGIN and CRAM-MD5 define no preparation and pass
the name as sent (valid UTF-8, no control characters), as USER does. PLAIN and LOGIN
passwords are handed to ``authenticate()`` unchanged, so a password that works with PASS
works with AUTH PLAIN: RFC 4616 section 2 allows no preparation "to interoperate with
an external system" (hashes made by other tools). SCRAM prepares the password on the
client side, and :func:`make_scram_credentials` prepares a clear secret the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import time
from dataclasses import dataclass
from typing import Protocol

import scramp

from tpops.auth.base import MailUser
from tpops.auth.credentials import (
    _SCRAM_SALT_BYTES,
    DOVECOT_SCRAM_PREFIX,
    SCRAM_ITERATIONS,
    BackendCaps,
    SaslPrepError,
    ScramCredentials,
    format_dovecot_scram,
    make_scram_credentials,
    parse_dovecot_scram,
    saslprep,
)
from tpops.logs import escape

__all__ = [
    "DOVECOT_SCRAM_PREFIX",
    "MAX_RESPONSE_LINE",
    "MECHANISMS",
    "SCRAM_ITERATIONS",
    "BackendCaps",
    "BadBase64",
    "Challenge",
    "Failure",
    "Mechanism",
    "Outcome",
    "SaslBackend",
    "SaslPrepError",
    "ScramCredentials",
    "Success",
    "decode_initial_response",
    "decode_response",
    "encode_challenge",
    "format_dovecot_scram",
    "make_mechanism",
    "make_scram_credentials",
    "mechanisms_for",
    "parse_dovecot_scram",
    "saslprep",
]

#: Longest client line during AUTH (RFC 5034 4: SASL lines may exceed RFC 2449's 255).
MAX_RESPONSE_LINE = 8192

#: Every mechanism this module implements, strongest first (the order CAPA lists them).
MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")

#: Key for the salts of SCRAM credentials derived here and of the mock credentials of
#: unknown users: one per master process (made at import, before fork), so a user's salt
#: is the same on every worker and an unknown user cannot be told from a known one by a
#: salt that changes between attempts.
_SALT_KEY = secrets.token_bytes(32)
#: What the timing twin of a SCRAM derivation derives from (the result is thrown away).
_DUMMY_SECRET = secrets.token_hex(16)


# ---------------------------------------------------------------- outcomes of a step

@dataclass(frozen=True)
class Challenge:
    """Send ``+ base64(data)`` and feed the client's answer to :meth:`Mechanism.step`."""

    data: bytes


@dataclass(frozen=True)
class Success:
    """The client proved it is ``user`` (as the backend returned it)."""

    user: MailUser


@dataclass(frozen=True)
class Failure:
    """Authentication failed. ``reason`` is for the log (client data escaped, no secrets);
    ``login`` the identity the client claimed, if it got that far (escape it to log it)."""

    reason: str
    login: str | None = None


Outcome = Challenge | Success | Failure


class Mechanism(Protocol):
    """One SASL exchange, server side. ``name`` is the mechanism's registered name."""

    name: str

    def start(self, initial: bytes | None) -> Outcome:
        """Begin; ``initial`` is the decoded initial response, ``None`` if the client sent none."""
        ...

    def step(self, response: bytes) -> Outcome:
        """The client's (decoded) answer to the last :class:`Challenge`."""
        ...


# ---------------------------------------------------------------- what the backend provides

class SaslBackend(Protocol):
    """What the mechanisms need from an authenticator.

    Every method applies ``$default_domain`` as ``authenticate`` does, returns ``None``
    for an unknown user (or one without that kind of secret), and raises
    :class:`~tpops.auth.AuthUnavailable` for backend trouble.

    ``authenticate(login, password)``
        The existing USER/PASS check (PLAIN, LOGIN).
    ``clear_secret(login)``
        The user and their clear-text secret, for CRAM-MD5 ({PLAIN} entries, clear MySQL
        rows, the APOP file).
    ``scram_credentials(login)``
        The user and what SCRAM-SHA-256 needs, from one lookup: stored credentials (a
        ``{SCRAM-SHA-256}`` value, see :func:`parse_dovecot_scram`), or else the
        clear-text secret (bytes) to derive them from; ``None`` when the user has
        neither (unknown, or a hashed password).
    """

    def authenticate(self, login: str, password: bytes) -> MailUser | None: ...

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None: ...

    def scram_credentials(self, login: str) -> tuple[MailUser, ScramCredentials | bytes] | None: ...


def mechanisms_for(caps: BackendCaps, *, plaintext_allowed: bool,
                   channel_binding: bool) -> tuple[str, ...]:
    """The mechanisms to offer on one connection, strongest first (for CAPA and bare AUTH).

    ``plaintext_allowed``: the password may cross this connection (TLS, loopback, or
    ``$disable_plaintext_auth`` false): PLAIN and LOGIN. Users with a hashed password
    can only use these. ``channel_binding``: the connection is TLS and the certificate
    has ``tls-server-end-point`` data (:attr:`tpops.tls.ServerTLS.end_point`):
    SCRAM-SHA-256-PLUS. CRAM-MD5 needs clear secrets; SCRAM either kind of credentials.
    """
    offered: list[str] = []
    if caps.clear_secrets or caps.scram:
        if channel_binding:
            offered.append("SCRAM-SHA-256-PLUS")
        offered.append("SCRAM-SHA-256")
    if caps.clear_secrets:
        offered.append("CRAM-MD5")
    if plaintext_allowed:
        offered += ["PLAIN", "LOGIN"]
    return tuple(offered)


# ---------------------------------------------------------------- base64 on the wire

class BadBase64(ValueError):
    """A client line is not strict base64 (RFC 4648); the caller answers ``-ERR``."""


def decode_response(line: str | bytes) -> bytes:
    """A continuation line decoded; an empty line is an empty response.

    Strict: only the base64 alphabet, correct padding, no spaces or line breaks.
    ``*`` (cancel) must be handled before calling this.
    """
    data = line.encode("ascii", "replace") if isinstance(line, str) else line
    if len(data) % 4:
        raise BadBase64("invalid base64: length is not a multiple of 4")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise BadBase64(f"invalid base64: {e}") from None


def decode_initial_response(argument: str | bytes) -> bytes:
    """The AUTH command's initial-response argument decoded; ``=`` means empty (RFC 5034 4)."""
    if argument in ("=", b"="):
        return b""
    return decode_response(argument)


def encode_challenge(data: bytes) -> str:
    """The text after ``+ `` for a challenge (empty for an empty challenge)."""
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- SASLprep (RFC 4013)

def _text(data: bytes, what: str) -> str:
    """UTF-8 text from the client, or :class:`_Refused` naming what was wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(f"{what} is not valid UTF-8") from None
    return text


def _login(data: bytes, *, prep: bool) -> str:
    """A login from the client: UTF-8, no control characters, SASLprep'd if ``prep``."""
    login = _text(data, "user name")
    if prep:
        try:
            login = saslprep(login)
        except SaslPrepError as e:
            raise _Refused(f"user name '{escape(login)}' refused by SASLprep: {e}") from None
    elif any(stringprep.in_table_c21_c22(c) for c in login):
        raise _Refused(f"user name '{escape(login)}' contains control characters")
    if not login:
        raise _Refused("empty user name")
    return login


class _Refused(Exception):
    """Internal: the client's message is malformed; becomes a :class:`Failure`."""


# ---------------------------------------------------------------- PLAIN, LOGIN

class Plain:
    """PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one message.

    An authorization identity is accepted only when empty or equal to the
    authentication identity (tpops has no proxy logins).
    """

    name = "PLAIN"

    def __init__(self, backend: SaslBackend) -> None:
        self._backend = backend

    def start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(b"")  # RFC 4616 2: the server sends an empty challenge
        return self.step(initial)

    def step(self, response: bytes) -> Outcome:
        fields = response.split(b"\0")
        if len(fields) != 3:
            return Failure("PLAIN: malformed message (expected authzid NUL authcid NUL password)")
        authzid_raw, authcid_raw, password = fields
        try:
            authcid = _login(authcid_raw, prep=True)
            authzid = _login(authzid_raw, prep=True) if authzid_raw else ""
        except _Refused as e:
            return Failure(f"PLAIN: {e}")
        if not password:
            return Failure("PLAIN: empty password", authcid)
        if len(authcid_raw) > 255 or len(password) > 255 or len(authzid_raw) > 255:
            return Failure("PLAIN: a field exceeds 255 octets (RFC 4616 2)", authcid)
        if authzid and authzid != authcid:
            return Failure(f"PLAIN: authorization identity '{escape(authzid)}' differs from "
                           f"authentication identity '{escape(authcid)}'", authcid)
        user = self._backend.authenticate(authcid, password)
        if user is None:
            return Failure("PLAIN: wrong password or unknown user", authcid)
        return Success(user)


class Login:
    """LOGIN (draft-murchison-sasl-login, what Outlook and Thunderbird use): the server
    asks ``Username:`` then ``Password:``; an initial response is the user name."""

    name = "LOGIN"

    def __init__(self, backend: SaslBackend) -> None:
        self._backend = backend
        self._login: str | None = None

    def start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, response: bytes) -> Outcome:
        if self._login is None:
            try:
                self._login = _login(response, prep=False)
            except _Refused as e:
                return Failure(f"LOGIN: {e}")
            return Challenge(b"Password:")
        if not response:
            return Failure("LOGIN: empty password", self._login)
        user = self._backend.authenticate(self._login, response)
        if user is None:
            return Failure("LOGIN: wrong password or unknown user", self._login)
        return Success(user)


# ---------------------------------------------------------------- CRAM-MD5

class CramMD5:
    """CRAM-MD5 (RFC 2195): challenge ``<random.time@hostname>``, answer ``user hexdigest``
    where the digest is HMAC-MD5 keyed with the clear secret."""

    name = "CRAM-MD5"

    def __init__(self, backend: SaslBackend, hostname: str) -> None:
        self._backend = backend
        self._challenge = f"<{secrets.randbelow(10**12)}.{int(time.time())}@{hostname}>".encode()

    @property
    def challenge(self) -> bytes:
        """The challenge this exchange sends (tests compute the client's answer from it)."""
        return self._challenge

    def start(self, initial: bytes | None) -> Outcome:
        if initial is not None:
            return Failure("CRAM-MD5: the client sent an initial response "
                           "(the server speaks first in CRAM-MD5)")
        return Challenge(self._challenge)

    def step(self, response: bytes) -> Outcome:
        name, sep, digest = response.rpartition(b" ")
        if not sep or len(digest) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in digest):
            return Failure("CRAM-MD5: malformed response (expected 'user hexdigest')")
        try:
            login = _login(name, prep=False)
        except _Refused as e:
            return Failure(f"CRAM-MD5: {e}")
        found = self._backend.clear_secret(login)
        secret = found[1] if found else secrets.token_bytes(16)  # same work either way
        expected = hmac.new(secret, self._challenge, hashlib.md5).hexdigest().encode()
        if found is None or not hmac.compare_digest(expected, digest.lower()):
            return Failure("CRAM-MD5: wrong digest, unknown user or no clear-text secret", login)
        return Success(found[0])


# ---------------------------------------------------------------- SCRAM-SHA-256(-PLUS)

def _keyed_salt(purpose: bytes, login: str) -> bytes:
    return hmac.new(_SALT_KEY, purpose + b"\0" + login.encode("utf-8", "surrogatepass"),
                    hashlib.sha256).digest()[:_SCRAM_SALT_BYTES]


class Scram:
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) and, with ``end_point``, SCRAM-SHA-256-PLUS
    with ``tls-server-end-point`` channel binding (RFC 5929), on top of ``scramp``.

    Credentials come from ``scram_credentials()``: stored ones, or derived from the
    clear secret it returns (with a salt fixed per user for the life of the master). An
    unknown user gets mock credentials and fails at the proof, like a wrong password,
    so the first step does not reveal whether a user exists.

    ``end_point`` (the served certificate's binding data) is given on TLS whenever
    SCRAM-SHA-256-PLUS is offered, for both mechanisms: the plain mechanism then refuses
    a client that says "y" (it believes the server lacks channel binding: a downgrade,
    RFC 5802 6), and a client that says "p" under the plain name is refused too.
    """

    def __init__(self, backend: SaslBackend, *, plus: bool, end_point: bytes | None) -> None:
        if plus and not end_point:
            raise ValueError("SCRAM-SHA-256-PLUS needs the tls-server-end-point data")
        self.name = "SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256"
        self._backend = backend
        self._plus = plus
        binding = ("tls-server-end-point", end_point) if end_point else None
        self._server = scramp.ScramMechanism(self.name).make_server(
            self._credentials, channel_binding=binding)
        self._user: MailUser | None = None
        self._login: str | None = None
        self._backend_error: BaseException | None = None
        self._state = "first"

    def _credentials(self, login: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's auth_fn: (salt, StoredKey, ServerKey, iterations) for ``login``."""
        self._login = login
        creds: ScramCredentials | None = None
        try:
            found = self._backend.scram_credentials(login)
        except BaseException as e:  # scramp would hide AuthUnavailable as NO_RESOURCES
            self._backend_error = e
            raise
        stored = found is not None and isinstance(found[1], ScramCredentials)
        if found is not None:
            user, secret = found
            creds = secret if isinstance(secret, ScramCredentials) else self._derive(secret, login)
            if creds is not None:
                self._user = user
        if self._user is None or stored:
            # Deriving from a clear secret costs one PBKDF2; stored credentials and
            # unknown users pay the same, so the timing tells no kind of user apart.
            make_scram_credentials(_DUMMY_SECRET, salt=_keyed_salt(b"dummy", login))
        if creds is None:  # unknown user: mock credentials that no proof matches
            creds = ScramCredentials(_keyed_salt(b"mock", login), SCRAM_ITERATIONS,
                                     secrets.token_bytes(32), secrets.token_bytes(32))
        return creds.salt, creds.stored_key, creds.server_key, creds.iterations

    @staticmethod
    def _derive(secret: bytes, login: str) -> ScramCredentials | None:
        try:
            return make_scram_credentials(secret, salt=_keyed_salt(b"derived", login))
        except (ValueError, UnicodeDecodeError):
            return None  # a secret SASLprep refuses cannot be used with SCRAM

    def _fail(self, error: scramp.ScramException) -> Failure:
        if self._backend_error is not None:
            raise self._backend_error
        login = self._login
        if self._user is None and login is not None and self._state == "final":
            return Failure(f"{self.name}: unknown user or no usable secret", login)
        return Failure(f"{self.name}: {escape(str(error))}", login)

    def start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(b"")  # client-first mechanism: ask for the client-first message
        return self.step(initial)

    def step(self, response: bytes) -> Outcome:
        try:
            if self._state == "first":
                return self._first(response)
            if self._state == "final":
                return self._final(response)
            if self._state == "done":  # the client's empty answer to server-final
                if response:
                    return Failure(f"{self.name}: unexpected data after server-final",
                                   self._login)
                assert self._user is not None
                return Success(self._user)
        except _Refused as e:
            return Failure(f"{self.name}: {e}", self._login)
        except scramp.ScramException as e:
            return self._fail(e)
        return Failure(f"{self.name}: exchange already finished", self._login)  # pragma: no cover

    def _first(self, response: bytes) -> Outcome:
        text = _text(response, "client-first message")
        if text.startswith("p=") and not self._plus:
            raise _Refused("channel binding requested with the non-PLUS mechanism")
        self._server.set_client_first(text)
        self._state = "final"
        return Challenge(self._server.get_server_first().encode("utf-8"))

    def _final(self, response: bytes) -> Outcome:
        self._server.set_client_final(_text(response, "client-final message"))
        if self._user is None:  # mock credentials cannot verify; belt and braces
            return Failure(f"{self.name}: unknown user or no usable secret", self._login)
        self._state = "done"
        return Challenge(self._server.get_server_final().encode("utf-8"))


# ---------------------------------------------------------------- factory

def make_mechanism(name: str, backend: SaslBackend, *, hostname: str,
                   end_point: bytes | None = None) -> Mechanism:
    """A fresh server exchange for mechanism ``name`` (case-insensitive).

    ``hostname`` goes into the CRAM-MD5 challenge; ``end_point`` is
    :attr:`tpops.tls.ServerTLS.end_point` on a TLS connection where -PLUS is offered
    (``None`` otherwise). Raises ``KeyError`` for a name not in :data:`MECHANISMS`; the
    caller checks first that the name is among those :func:`mechanisms_for` offers here.
    """
    upper = name.upper()
    if upper == "PLAIN":
        return Plain(backend)
    if upper == "LOGIN":
        return Login(backend)
    if upper == "CRAM-MD5":
        return CramMD5(backend, hostname)
    if upper == "SCRAM-SHA-256":
        return Scram(backend, plus=False, end_point=end_point)
    if upper == "SCRAM-SHA-256-PLUS":
        return Scram(backend, plus=True, end_point=end_point)
    raise KeyError(name)
