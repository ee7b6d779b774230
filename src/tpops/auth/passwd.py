"""The Passwd backend (``$auth_type = 'Passwd'``, the default): system accounts, optional APOP file.

USER/PASS is checked against the account's hash in ``/etc/shadow`` (or the passwd
entry itself on shadow-less systems) with the system's crypt(3), so every format
the system writes works, yescrypt (``$y$``, Debian 12's default) included. Reading
``/etc/shadow`` needs root. Locked (``!``/``*``/empty hash), expired (shadow
``expire``, or password aging: ``lastchg`` 0 or ``lastchg + max`` in the past) and
uid-0 accounts are refused exactly like a wrong password, with the reason logged.
The Maildir is ``home/Maildir``; the session runs as the account's uid/gid.

APOP secrets live in ``$apop_passwd_file``: either the 2003 server's Berkeley DB hash
(as ``postmap``/``db_load`` write it: keys and values NUL-terminated; keys without
the NUL are accepted too), read with the optional ``berkeleydb`` binding, or a text
file of ``login:secret`` lines (``#`` comments), as ``tpops-apoppasswd`` writes it.
The format is told by the Berkeley DB magic number. The file is re-read when it
changes. An APOP user must also be a usable system account. The same secrets serve AUTH
CRAM-MD5 and SCRAM-SHA-256 (:meth:`PasswdAuthenticator.clear_secret`).
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpops.auth import hashes
from tpops.auth.base import (
    AuthUnavailable,
    LockingAuthenticator,
    MailUser,
    apply_default_domain,
    file_key,
)
from tpops.auth.credentials import BackendCaps, ScramCredentials
from tpops.logs import escape, get

if TYPE_CHECKING:
    from tpops.config import Config

log = get("auth.passwd")

SHADOW = "/etc/shadow"
#: Berkeley DB magic numbers (at offset 12 of the first page): hash, btree.
_BDB_MAGICS = (0x061561, 0x053162)
_NOT_A_HASH = ("x", "*", "!", "*NP*", "")


@dataclass(frozen=True)
class _Account:
    """A system account as far as authentication cares."""

    login: str
    uid: int
    gid: int
    home: str
    hash: str
    refusal: str | None  # why it may not log in (locked, expired, ...), None if it may


@dataclass(frozen=True)
class _Secrets:
    """The APOP secrets file as last read, and the ``stat`` identity it was read at."""

    key: tuple[int, ...]
    secrets: dict[str, str]


def _locked(stored: str) -> bool:
    """Whether a password field holds no usable hash (shadow placeholder, ``!``/``*`` lock, empty)."""
    return stored in _NOT_A_HASH or stored[0] in "!*"


def _days(text: str) -> int | None:
    """A shadow day-count field: an int, or None when empty or not a number."""
    text = text.strip()
    if not text or not text.lstrip("-").isdigit():
        return None
    return int(text)


def shadow_refusal(fields: list[str], today: int) -> str | None:
    """Why a shadow entry (its colon-separated fields) may not log in today, or None.

    The rules are pam_unix's: the account ``expire`` day has come; ``lastchg`` 0
    ("must change the password"); or the password is older than ``max`` days.
    """
    fields = fields + [""] * (9 - len(fields))
    lastchg, max_age, expire = _days(fields[2]), _days(fields[4]), _days(fields[7])
    if expire is not None and expire >= 0 and today >= expire:
        return "account expired"
    if lastchg == 0:
        return "password must be changed (lastchg 0)"
    if lastchg is not None and max_age is not None and max_age >= 0 and lastchg + max_age < today:
        return "password expired (max age)"
    return None


def _read_shadow(login: str, path: str) -> list[str] | None:
    """The shadow fields of ``login``, None when it has no shadow entry."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                fields = line.split(":")
                if fields[0] == login and len(fields) >= 2:
                    return fields
    except PermissionError as e:
        raise AuthUnavailable(f"Passwd: cannot read {path} (tpops must run as root for Passwd)") from e
    except OSError as e:
        raise AuthUnavailable(f"Passwd: cannot read {path}: {e.strerror or e}") from e
    return None


def is_bdb(head: bytes) -> bool:
    """Whether a file's first bytes are a Berkeley DB hash/btree (either byte order)."""
    if len(head) < 16:
        return False
    return any(
        int.from_bytes(head[12:16], order) in _BDB_MAGICS for order in ("little", "big")
    )


def _read_bdb(path: str) -> dict[str, str]:
    """All login -> secret pairs of a Berkeley DB file (postmap's NUL-terminated form or bare)."""
    try:
        from berkeleydb import db
    except ImportError as e:
        raise AuthUnavailable(
            f"Passwd: {path} is a Berkeley DB file but the berkeleydb module is not installed "
            "(pip install berkeleydb, or convert the file to login:secret text)"
        ) from e
    table = db.DB()
    try:
        table.open(path, None, db.DB_UNKNOWN, db.DB_RDONLY)
        cursor = table.cursor()
        pairs: dict[str, str] = {}
        terminated: set[str] = set()
        item = cursor.first()
        while item is not None:
            key, value = item
            nul = key.endswith(b"\0")
            login = (key[:-1] if nul else key).decode("utf-8", "surrogateescape")
            secret = (value[:-1] if value.endswith(b"\0") else value).decode("utf-8", "surrogateescape")
            if nul or login not in terminated:  # postmap's NUL-terminated key wins
                pairs[login] = secret
                if nul:
                    terminated.add(login)
            item = cursor.next()
        cursor.close()
        return pairs
    except db.DBError as e:
        raise AuthUnavailable(f"Passwd: cannot read Berkeley DB {path}: {e.args[-1] if e.args else e}") from e
    finally:
        table.close()


def parse_secrets_text(text: str, path: str) -> dict[str, str]:
    """``login:secret`` lines (``#`` comments, blank lines); bad lines logged, first login wins."""
    pairs: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        login, colon, secret = line.partition(":")
        if not colon or not login:
            log.error("%s line %d: not login:secret, ignored", escape(path), lineno)
            continue
        if login in pairs:
            log.warning("%s line %d: duplicate login %s ignored", escape(path), lineno, escape(login))
            continue
        pairs[login] = secret
    return pairs


def read_secrets(path: str) -> dict[str, str]:
    """The APOP secrets of a file in either format (told by the Berkeley DB magic)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AuthUnavailable(f"Passwd: cannot read APOP file {path}: {e.strerror or e}") from e
    if is_bdb(data[:16]):
        return _read_bdb(path)
    return parse_secrets_text(data.decode("utf-8", "surrogateescape"), path)


class PasswdAuthenticator(LockingAuthenticator):
    """System accounts (passwd + shadow), with APOP secrets from ``$apop_passwd_file``."""

    name = "Passwd"

    def __init__(self, config: Config, *, shadow_path: str = SHADOW) -> None:
        super().__init__(config.passwd_lock_dir, config)
        self._domain: str | None = config.default_domain
        self._apop_path: str | None = config.apop_passwd_file or None
        self._shadow_path = shadow_path
        self._secrets: _Secrets | None = None

    def prepare(self) -> None:
        """Handlers and crypt(3) imported; the APOP secrets read (and berkeleydb loaded) as root."""
        super().prepare()
        if self._apop_path is not None:
            try:
                self._apop_secrets()
            except AuthUnavailable as e:  # the first APOP login reports it again
                log.error("%s", e)

    def check(self) -> None:
        """The shadow file and the APOP file are readable by the workers' identity.

        Run in the pre-flight worker after ``--user`` was applied: without this, a
        ``--user`` (or an ordinary invoker) that cannot read ``/etc/shadow`` would start
        and then answer every login ``[SYS/TEMP]`` (issue 8 item 6).
        """
        super().check()
        paths = [(self._shadow_path, "the shadow file")] if os.path.exists(self._shadow_path) else []
        if self._apop_path is not None:
            paths.append((self._apop_path, "$apop_passwd_file"))
        for path, what in paths:
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                raise ValueError(
                    f"$auth_type 'Passwd' needs to read {what} {path}, which uid {os.geteuid()} "
                    f"(the workers' identity) cannot: {e.strerror or e}; run as root without --user, "
                    f"or use the File or MySQL authenticator"
                ) from None

    @property
    def supports_apop(self) -> bool:
        """True when ``$apop_passwd_file`` is set."""
        return self._apop_path is not None

    def _account(self, login: str) -> _Account | None:
        """The system account for a login, None when there is none (or the name is impossible)."""
        try:
            entry = pwd.getpwnam(login)
        except (KeyError, ValueError, UnicodeError):  # unknown, NUL inside, unencodable
            return None
        if entry.pw_uid == 0:  # never served: its hash is not even read
            return _Account(login, 0, entry.pw_gid, entry.pw_dir, "", "uid 0 is never served")
        stored = entry.pw_passwd
        refusal: str | None = None
        if _locked(stored):
            fields = _read_shadow(login, self._shadow_path)
            if fields is not None:
                stored = fields[1]
                refusal = shadow_refusal(fields, int(time.time() // 86400))
        if _locked(stored):
            refusal = "account locked or without password"
        elif not os.path.isabs(entry.pw_dir):
            refusal = "home directory is not an absolute path"
        return _Account(login, entry.pw_uid, entry.pw_gid, entry.pw_dir, stored, refusal)

    def _user(self, account: _Account) -> MailUser:
        """The :class:`MailUser` of a usable account."""
        return MailUser(account.login, os.path.join(account.home, "Maildir"), account.uid, account.gid)

    def authenticate(self, login: str, password: bytes) -> MailUser | None:
        """USER/PASS against the system account; None for bad credentials or an unusable account."""
        login = apply_default_domain(login, self._domain)
        account = self._account(login)
        if account is None:
            log.info("login %s refused: no such user", escape(login))
            hashes.dummy_crypt_verify(password)
            return None
        if account.refusal is not None and (account.uid == 0 or _locked(account.hash)):
            log.warning("login %s refused: %s", escape(login), account.refusal)
            hashes.dummy_crypt_verify(password)
            return None
        try:
            ok = hashes.crypt_verify(password, account.hash)
        except ImportError as e:
            raise AuthUnavailable(f"Passwd: {e}") from e
        if not ok:
            log.info("login %s refused: wrong password", escape(login))
            return None
        if account.refusal is not None:
            log.warning("login %s refused: %s", escape(login), account.refusal)
            return None
        return self._user(account)

    def _apop_secrets(self) -> dict[str, str]:
        """The APOP secrets, re-read when the file's identity changed."""
        assert self._apop_path is not None
        try:
            st = os.stat(self._apop_path)
        except OSError as e:
            raise AuthUnavailable(f"Passwd: cannot read APOP file {self._apop_path}: {e.strerror or e}") from e
        key = file_key(st)
        if self._secrets is None or self._secrets.key != key:
            self._secrets = _Secrets(key, read_secrets(self._apop_path))
        return self._secrets.secrets

    def authenticate_apop(self, login: str, timestamp: str, digest: str) -> MailUser | None:
        """APOP with the secret from ``$apop_passwd_file``; the account must be usable too."""
        if self._apop_path is None:
            log.info("APOP login %s refused: no $apop_passwd_file", escape(login))
            return None
        login = apply_default_domain(login, self._domain)
        account = self._account(login)
        if account is None:
            log.info("APOP login %s refused: no such user", escape(login))
            return None
        secret = self._apop_secrets().get(login)
        if secret is None:
            log.info("APOP login %s refused: no APOP secret for it", escape(login))
            return None
        if not hashes.apop_digest_ok(timestamp, secret, digest):
            log.info("APOP login %s refused: wrong digest", escape(login))
            return None
        if account.refusal is not None:
            log.warning("APOP login %s refused: %s", escape(login), account.refusal)
            return None
        return self._user(account)

    @property
    def sasl_caps(self) -> BackendCaps:
        """CRAM-MD5 and SCRAM (from the APOP secrets) when ``$apop_passwd_file`` is set."""
        return BackendCaps(clear_secrets=self._apop_path is not None)

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None:
        """SASL CRAM-MD5/SCRAM: the account and its ``$apop_passwd_file`` secret; None when
        there is no such file, account or secret, or the account may not log in."""
        if self._apop_path is None:
            return None
        login = apply_default_domain(login, self._domain)
        account = self._account(login)
        if account is None:
            log.info("SASL login %s refused: no such user", escape(login))
            return None
        secret = self._apop_secrets().get(login)
        if secret is None:
            log.info("SASL login %s refused: no secret for it in $apop_passwd_file", escape(login))
            return None
        if account.refusal is not None:
            log.warning("SASL login %s refused: %s", escape(login), account.refusal)
            return None
        return self._user(account), secret.encode("utf-8", "surrogateescape")

    def scram_credentials(self, login: str) -> tuple[MailUser, ScramCredentials | bytes] | None:
        """Never stored here: the :meth:`clear_secret`, which SCRAM derives them from."""
        return self.clear_secret(login)
