"""Stored SASL credentials: SCRAM-SHA-256 values in Dovecot's format, SASLprep, backend capabilities.

The part of SASL that the password store needs, apart from the mechanisms of
:mod:`tpops.sasl`: :mod:`tpops.auth.hashes` verifies a USER/PASS password against a
stored ``{SCRAM-SHA-256}`` value with :func:`scram_verify`, ``tpops-passwd`` writes one
with :func:`format_dovecot_scram`, and the backends say with :class:`BackendCaps`
which secrets they can give the mechanisms. Nothing here imports the rest of tpops, so
the authenticators can use it without an import cycle through :mod:`tpops.sasl`
(which re-exports every name).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import scramp

__all__ = [
    "DOVECOT_SCRAM_PREFIX",
    "SCRAM_ITERATIONS",
    "BackendCaps",
    "SaslPrepError",
    "ScramCredentials",
    "format_dovecot_scram",
    "make_scram_credentials",
    "parse_dovecot_scram",
    "saslprep",
    "scram_verify",
]

#: PBKDF2 rounds for SCRAM credentials made here (RFC 7677 4: at least 4096; Dovecot's default).
SCRAM_ITERATIONS = 4096
_SCRAM_SALT_BYTES = 16  # as Dovecot
_SHA256_BYTES = 32


@dataclass(frozen=True)
class ScramCredentials:
    """SCRAM-SHA-256 server credentials (RFC 5802 3): what is stored instead of a password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True)
class BackendCaps:
    """Which secrets a backend, as configured, can produce for at least some users.

    ``clear_secrets``: ``clear_secret()`` can answer (CRAM-MD5; SCRAM from the secret).
    ``scram``: ``scram_credentials()`` can answer with stored ``{SCRAM-SHA-256}`` values.
    """

    clear_secrets: bool = False
    scram: bool = False


class SaslPrepError(ValueError):
    """The string is prohibited by SASLprep; the message says why (no client data in it)."""


_PROHIBITED: tuple[tuple[Callable[[str], bool], str], ...] = (
    (stringprep.in_table_c12, "non-ASCII space"),
    (stringprep.in_table_c21, "ASCII control character"),
    (stringprep.in_table_c22, "non-ASCII control character"),
    (stringprep.in_table_c3, "private use character"),
    (stringprep.in_table_c4, "non-character code point"),
    (stringprep.in_table_c5, "surrogate code point"),
    (stringprep.in_table_c6, "character inappropriate for plain text"),
    (stringprep.in_table_c7, "character inappropriate for canonical representation"),
    (stringprep.in_table_c8, "change-of-direction or deprecated character"),
    (stringprep.in_table_c9, "tagging character"),
)


def saslprep(text: str, *, allow_unassigned: bool = True) -> str:
    """``text`` prepared with the SASLprep profile of stringprep (RFC 4013, RFC 3454).

    Maps non-ASCII spaces to SPACE and removes characters "commonly mapped to nothing"
    (the soft hyphen, zero-width joiners), normalises with NFKC (Unicode 3.2, the
    stdlib :mod:`stringprep` tables), then refuses prohibited characters and bad
    bidirectional strings with :class:`SaslPrepError`. ``allow_unassigned`` is true for
    "query" strings (what a client presents) and false for "stored" ones (RFC 3454 7).
    An empty result is returned as is; callers refuse it.
    """
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for c in prepared:
        for in_table, what in _PROHIBITED:
            if in_table(c):
                raise SaslPrepError(f"prohibited {what} U+{ord(c):04X}")
        if not allow_unassigned and stringprep.in_table_a1(c):
            raise SaslPrepError(f"unassigned code point U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in prepared):  # RFC 3454 6: bidi rules
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise SaslPrepError("mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise SaslPrepError("a right-to-left string must start and end with "
                                "right-to-left characters")
    return prepared


DOVECOT_SCRAM_PREFIX = "{SCRAM-SHA-256}"


def make_scram_credentials(secret: str | bytes, *, iterations: int = SCRAM_ITERATIONS,
                           salt: bytes | None = None) -> ScramCredentials:
    """SCRAM-SHA-256 credentials for a clear secret (SASLprep'd as RFC 5802 asks).

    Raises :class:`SaslPrepError` (or ``UnicodeDecodeError`` for non-UTF-8 bytes) when
    the secret cannot be used with SCRAM.
    """
    text = secret.decode("utf-8") if isinstance(secret, bytes) else secret
    saslprep(text, allow_unassigned=False)  # our message rather than scramp's
    salt = salt if salt is not None else secrets.token_bytes(_SCRAM_SALT_BYTES)
    try:
        salt, stored_key, server_key, rounds = scramp.ScramMechanism("SCRAM-SHA-256") \
            .make_auth_info(text, iteration_count=iterations, salt=salt)
    except scramp.ScramException as e:
        raise ValueError(f"cannot make SCRAM credentials: {e}") from None
    return ScramCredentials(salt, rounds, stored_key, server_key)


def format_dovecot_scram(credentials: ScramCredentials) -> str:
    """Dovecot's stored form: ``{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey`` (base64)."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return (f"{DOVECOT_SCRAM_PREFIX}{credentials.iterations},{b64(credentials.salt)},"
            f"{b64(credentials.stored_key)},{b64(credentials.server_key)}")


def parse_dovecot_scram(value: str) -> ScramCredentials:
    """Credentials from Dovecot's ``{SCRAM-SHA-256}`` format (the prefix is optional).

    Raises ``ValueError`` saying what is wrong (never echoing the value: it is a secret).
    """
    body = value[len(DOVECOT_SCRAM_PREFIX):] if value.upper().startswith(DOVECOT_SCRAM_PREFIX) \
        else value
    fields = body.split(",")
    if len(fields) != 4:
        raise ValueError("SCRAM-SHA-256 value must be iterations,salt,StoredKey,ServerKey")
    rounds, salt, stored, server = fields
    if not rounds.isascii() or not rounds.isdigit() or rounds.startswith("0"):
        raise ValueError("SCRAM-SHA-256 iteration count is not a number")
    if not 4096 <= int(rounds) <= 10_000_000:
        raise ValueError("SCRAM-SHA-256 iteration count must be between 4096 and 10000000")
    try:
        salt_b, stored_b, server_b = (base64.b64decode(f, validate=True)
                                      for f in (salt, stored, server))
    except binascii.Error:
        raise ValueError("SCRAM-SHA-256 value has invalid base64") from None
    if len(salt_b) < 12:  # scramp's (and common) minimum
        raise ValueError("SCRAM-SHA-256 salt is shorter than 12 octets")
    if len(stored_b) != _SHA256_BYTES or len(server_b) != _SHA256_BYTES:
        raise ValueError("SCRAM-SHA-256 StoredKey and ServerKey must be 32 octets")
    return ScramCredentials(salt_b, int(rounds), stored_b, server_b)


def scram_verify(secret: bytes, credentials: ScramCredentials) -> bool:
    """Whether a USER/PASS (or AUTH PLAIN) password matches stored SCRAM-SHA-256 credentials.

    The password is SASLprep'd and run through PBKDF2 with the stored salt and
    iteration count, as a SCRAM client would; both StoredKey and ServerKey are
    compared in constant time. A password SASLprep refuses (or not UTF-8) never matches,
    after the same PBKDF2 work on the raw bytes, so it costs what a wrong one costs.
    """
    try:
        made = make_scram_credentials(secret, iterations=credentials.iterations, salt=credentials.salt)
    except (ValueError, UnicodeDecodeError):
        hashlib.pbkdf2_hmac("sha256", secret, credentials.salt, credentials.iterations)
        return False
    stored_ok = hmac.compare_digest(made.stored_key, credentials.stored_key)
    server_ok = hmac.compare_digest(made.server_key, credentials.server_key)
    return stored_ok and server_ok
