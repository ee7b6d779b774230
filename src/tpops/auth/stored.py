"""The shared half of the File and MySQL backends: check a stored password, in constant-looking time.

Both backends look a login up and get back a stored password (``{SCHEME}value``, a
bare crypt hash, or, for MySQL's 2003 rows, clear text). Everything after the lookup
lives here once, so the timing defence cannot drift between them:

* ``--domain`` / ``$default_domain`` is applied before the lookup;
* an unknown user (or an unusable entry) costs a dummy check of the scheme and cost
  most real users have (:meth:`StoredPasswordAuthenticator.dummy_verify`: bcrypt,
  argon2, yescrypt, SHA512-CRYPT, SSHA ... as the backend's entries use them), so
  "no such user" and "wrong password" take the same time;
* a failed clear-text comparison (microseconds) pays the same dummy check, so a
  ``{PLAIN}`` user's wrong password cannot be told from an unknown user either;
* APOP compares MD5 digests in constant time and works only for clear-text entries;
* SASL (:mod:`tpops.sasl`): :meth:`~StoredPasswordAuthenticator.clear_secret` gives
  CRAM-MD5 and SCRAM the clear text of ``{PLAIN}`` entries (and MySQL's clear rows),
  :meth:`~StoredPasswordAuthenticator.scram_credentials` SCRAM's, from the same one
  lookup: those of ``{SCRAM-SHA-256}`` entries, else that clear text; the mechanisms
  do the unknown user's dummy work.

A backend supplies :meth:`StoredPasswordAuthenticator.lookup` (and its own
``lock``/``prepare``/``close``); it logs why a login has no usable entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tpops.auth import hashes
from tpops.auth.base import MailUser, apply_default_domain
from tpops.auth.credentials import ScramCredentials
from tpops.logs import escape


@dataclass(frozen=True)
class StoredEntry:
    """What a lookup found: the canonical login, the stored password and the mailbox."""

    login: str
    stored: str
    maildir: str
    uid: int | None = None
    gid: int | None = None

    def user(self) -> MailUser:
        """The authenticated :class:`MailUser` of this entry."""
        return MailUser(self.login, self.maildir, self.uid, self.gid)


class StoredPasswordAuthenticator:
    """USER/PASS and APOP for backends that store one password per login (File, MySQL).

    Subclasses set ``name`` and ``plain_ok`` (bare clear text accepted: MySQL's legacy
    rows) and implement :meth:`lookup`.
    """

    name: str = "stored"
    #: Whether a stored value without ``{SCHEME}`` that is no crypt hash is clear text.
    plain_ok: bool = False

    def __init__(self, default_domain: str | None, log: logging.Logger) -> None:
        self._domain = default_domain
        self._log = log

    def lookup(self, login: str) -> StoredEntry | None:
        """The usable entry of ``login`` (default domain applied), None (logged) when there is none.

        Raises :class:`tpops.auth.base.AuthUnavailable` when the store cannot be read.
        """
        raise NotImplementedError

    def dummy_template(self) -> str | None:
        """A stored value of the scheme and cost most users have (see :class:`hashes.SchemeTally`)."""
        return None

    def dummy_verify(self, password: bytes) -> None:
        """Work like a real check of the majority scheme and cost, for a login without a password."""
        hashes.dummy_verify(password, self.dummy_template(), plain_ok=self.plain_ok)

    def authenticate(self, login: str, password: bytes) -> MailUser | None:
        """USER/PASS: the entry's :class:`MailUser`, or None for bad credentials."""
        login = apply_default_domain(login, self._domain)
        entry = self.lookup(login)
        if entry is None:
            self.dummy_verify(password)
            return None
        if not hashes.verify_password(password, entry.stored, plain_ok=self.plain_ok):
            if hashes.plain_secret(entry.stored, plain_ok=self.plain_ok) is not None:
                self.dummy_verify(password)  # a failed clear-text check costs what an unknown user does
            self._log.info("login %s refused: wrong password", escape(login))
            return None
        return entry.user()

    def authenticate_apop(self, login: str, timestamp: str, digest: str) -> MailUser | None:
        """APOP (RFC 1939 section 7): only entries with a clear-text password can match."""
        login = apply_default_domain(login, self._domain)
        entry = self.lookup(login)
        if entry is None:
            return None
        secret = hashes.plain_secret(entry.stored, plain_ok=self.plain_ok)
        if secret is None:
            self._log.info("APOP login %s refused: the stored password is a hash, APOP needs clear text "
                           "({PLAIN})", escape(login))
            return None
        if not hashes.apop_digest_ok(timestamp, secret, digest):
            self._log.info("APOP login %s refused: wrong digest", escape(login))
            return None
        return entry.user()

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None:
        """SASL CRAM-MD5 (and SCRAM without stored credentials): the clear-text password
        of a ``{PLAIN}`` entry (or a MySQL clear row); None for hashes and unknown users."""
        login = apply_default_domain(login, self._domain)
        entry = self.lookup(login)
        if entry is None:
            return None
        secret = hashes.plain_secret(entry.stored, plain_ok=self.plain_ok)
        if secret is None:
            self._log.info("SASL login %s: the stored password is a hash, CRAM-MD5 needs clear text ({PLAIN})",
                           escape(login))
            return None
        return entry.user(), secret.encode("utf-8", "surrogateescape")

    def scram_credentials(self, login: str) -> tuple[MailUser, ScramCredentials | bytes] | None:
        """SASL SCRAM-SHA-256, in one lookup: the credentials of a ``{SCRAM-SHA-256}``
        entry, else the clear-text password to derive them from; None for hashes and
        unknown users."""
        login = apply_default_domain(login, self._domain)
        entry = self.lookup(login)
        if entry is None:
            return None
        found = hashes.scram_secret(entry.stored)
        if found is not None:
            return entry.user(), found
        secret = hashes.plain_secret(entry.stored, plain_ok=self.plain_ok)
        if secret is None:
            self._log.info("SASL login %s: the stored password is a hash, SCRAM-SHA-256 needs clear text "
                           "({PLAIN}) or {SCRAM-SHA-256}", escape(login))
            return None
        return entry.user(), secret.encode("utf-8", "surrogateescape")
