"""Password checks for every backend: Dovecot-style ``{SCHEME}`` values, crypt hashes, plain text, APOP.

Stored passwords come in three shapes:

``{SCHEME}body``
    Dovecot's notation (``{SHA512-CRYPT}$6$...``, ``{SSHA}base64``, ``{PLAIN}secret``,
    ...). Scheme names are case-insensitive. Each scheme maps to a passlib handler
    (the ``libpass`` distribution provides the passlib API); see :data:`SCHEMES`.
    Dovecot's ``.HEX`` encoding suffix is accepted for the salted/unsalted SHA and
    MD5 digests (``{SSHA256.HEX}``), and ``.B64``/``.BASE64`` for ``PLAIN``.
a bare crypt hash
    ``$6$...``, ``$5$...``, ``$1$...``, ``$2b$``/``$2y$...``, ``$argon2id$...``
    (identified by passlib), and the system-only ``$y$`` (yescrypt), ``$gy$`` and
    ``$7$`` formats, which passlib cannot compute and are handed to crypt(3).
plain text
    Anything else, accepted only where the caller says so (``plain_ok=True``: the
    MySQL backend, whose 2003 schema stored clear text).

Secrets are ``bytes`` (what the client sent). Comparisons of clear text and
digests use :func:`hmac.compare_digest`. Nothing here ever logs a secret or a
stored value; a log line names at most the scheme.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType

from passlib import exc as passlib_exc
from passlib import hash as passlib_hash

from tpops.auth import credentials
from tpops.logs import escape, get

log = get("auth.hashes")


@dataclass(frozen=True)
class _Scheme:
    """How one Dovecot scheme is checked.

    ``kind``: ``plain`` (clear text), ``plain-trunc``, ``crypt`` (a crypt(3)-style
    string checked by a passlib handler with crypt(3) as fallback), ``argon2``,
    ``ldap`` (base64 of digest[+salt], checked by a passlib ``ldap_*`` handler with a
    hashlib fallback for salt lengths passlib refuses), ``hex`` (hex digest), ``scram``
    (Dovecot's ``{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey``: the password is
    run through PBKDF2 as a SCRAM client would and both keys compared).
    """

    kind: str
    handler: str | None = None  # passlib.hash attribute name
    ident: str | None = None  # the prefix passlib's ldap_* handler expects
    digest: str | None = None  # hashlib name, for the ldap fallback
    salted: bool = False


#: Dovecot scheme name -> how it is verified.
SCHEMES: dict[str, _Scheme] = {
    "PLAIN": _Scheme("plain"),
    "CLEARTEXT": _Scheme("plain"),
    "PLAIN-TRUNC": _Scheme("plain-trunc"),
    "CRYPT": _Scheme("crypt"),  # any crypt(3) format, DES included
    "DES-CRYPT": _Scheme("crypt", "des_crypt"),
    "MD5-CRYPT": _Scheme("crypt", "md5_crypt"),
    "MD5": _Scheme("crypt", "md5_crypt"),  # Dovecot's {MD5} is MD5-CRYPT
    "SHA256-CRYPT": _Scheme("crypt", "sha256_crypt"),
    "SHA512-CRYPT": _Scheme("crypt", "sha512_crypt"),
    "BLF-CRYPT": _Scheme("crypt", "bcrypt"),
    "ARGON2I": _Scheme("argon2", "argon2"),
    "ARGON2ID": _Scheme("argon2", "argon2"),
    "SSHA": _Scheme("ldap", "ldap_salted_sha1", "{SSHA}", "sha1", True),
    "SSHA256": _Scheme("ldap", "ldap_salted_sha256", "{SSHA256}", "sha256", True),
    "SSHA512": _Scheme("ldap", "ldap_salted_sha512", "{SSHA512}", "sha512", True),
    "SMD5": _Scheme("ldap", "ldap_salted_md5", "{SMD5}", "md5", True),
    "SHA": _Scheme("ldap", "ldap_sha1", "{SHA}", "sha1"),
    "SHA1": _Scheme("ldap", "ldap_sha1", "{SHA}", "sha1"),
    "SHA256": _Scheme("ldap", None, None, "sha256"),
    "SHA512": _Scheme("ldap", None, None, "sha512"),
    "LDAP-MD5": _Scheme("ldap", "ldap_md5", "{MD5}", "md5"),
    "PLAIN-MD5": _Scheme("hex", "hex_md5"),
    "SCRAM-SHA-256": _Scheme("scram"),
}

#: passlib handlers tried, in order, on a bare ``$...`` hash.
BARE_HANDLERS: tuple[str, ...] = ("sha512_crypt", "sha256_crypt", "md5_crypt", "bcrypt", "argon2")

#: crypt(3) handlers tried on a ``{CRYPT}`` body (DES included there, never bare).
CRYPT_HANDLERS: tuple[str, ...] = ("des_crypt", *BARE_HANDLERS[:-1])

_PREFIX = re.compile(r"\{([A-Za-z0-9._-]+)\}(.*)", re.DOTALL)
# crypt(3) formats passlib cannot compute: yescrypt, gost-yescrypt, scrypt.
_SYSTEM_ONLY = re.compile(r"\$(?:y|gy|7)\$[./0-9A-Za-z]+\$[./0-9A-Za-z]*\$[./0-9A-Za-z]{43}")
_BCRYPT_MAX = 72  # bcrypt ignores what follows; the bcrypt package (5.x) refuses it instead

#: A sha512-crypt hash of a random throwaway secret with crypt(3)'s default 5000 rounds
#: (what ``doveadm pw -s SHA512-CRYPT`` and ``chpasswd -c SHA512`` write): the
#: timing twin of a typical stored hash. Made once at import; nobody knows its secret.
_DUMMY_SHA512 = passlib_hash.sha512_crypt.using(rounds=5000).hash(secrets.token_hex(16))
#: A yescrypt hash (Debian 12's default cost ``j9T``) of a random throwaway secret:
#: the timing twin for system accounts. Not a secret.
_DUMMY_YESCRYPT = "$y$j9T$Fbc1N4UNRZPb1ma.Wp7jz1Qa$JCxRDAqi8ta5kLgx8hrf1L4eRDbkxRH6aqB4b1AX1J8"


def _split_scheme(stored: str) -> tuple[str, str] | None:
    """``("SHA512-CRYPT", body)`` for ``{sha512-crypt}body``; None when there is no prefix."""
    match = _PREFIX.fullmatch(stored)
    if match is None:
        return None
    return match.group(1).upper(), match.group(2)


def _resolve(name: str) -> tuple[_Scheme, str] | None:
    """The scheme for a (possibly encoding-suffixed) name, and the encoding ('' = default)."""
    if name in SCHEMES:
        return SCHEMES[name], ""
    base, _, encoding = name.rpartition(".")
    scheme = SCHEMES.get(base)
    if scheme is None:
        return None
    if scheme.kind == "plain" and encoding in ("B64", "BASE64"):
        return scheme, "B64"
    if scheme.kind == "ldap" and encoding in ("HEX", "B64", "BASE64"):
        return scheme, "HEX" if encoding == "HEX" else ""
    return None


def _handler(name: str) -> object:
    """A passlib handler by its ``passlib.hash`` name."""
    return getattr(passlib_hash, name)


def _parses(handler_name: str, value: str) -> bool:
    """Whether passlib's handler both identifies and can parse ``value`` (a well-formed hash)."""
    handler = _handler(handler_name)
    try:
        if not handler.identify(value):  # type: ignore[attr-defined]
            return False
        from_string = getattr(handler, "from_string", None)
        if from_string is not None and getattr(from_string(value), "checksum", "") is None:
            return False  # a bare setting ("$1$salt"), not a hash
        return True
    except (ValueError, TypeError):
        return False


def _bare_handler(value: str, *, strict: bool) -> str | None:
    """The passlib handler for a bare crypt hash. ``strict``: it must also parse."""
    if not value.startswith("$"):
        return None
    for name in BARE_HANDLERS:
        if _parses(name, value) if strict else _handler(name).identify(value):  # type: ignore[attr-defined]
            return name
    return None


def identify(stored: str, *, plain_ok: bool = False) -> str | None:
    """The scheme a stored value will be checked with, or None when it cannot be checked.

    Returns the Dovecot scheme name for ``{SCHEME}`` values (None for an unknown scheme
    or a malformed crypt-style body), ``"crypt:<handler>"`` or
    ``"crypt:system"`` for bare crypt hashes, ``"plain"`` for bare clear text when
    ``plain_ok``. Backends use it to reject unusable entries when they load them.
    """
    split = _split_scheme(stored)
    if split is not None:
        resolved = _resolve(split[0])
        if resolved is None:
            return None
        scheme = resolved[0]
        if scheme.kind in ("crypt", "argon2") and scheme.handler and not _parses(scheme.handler, split[1]):
            return None
        if scheme.kind == "scram":
            try:
                credentials.parse_dovecot_scram(split[1])
            except ValueError:
                return None
        return split[0]
    name = _bare_handler(stored, strict=True)
    if name is not None:
        return f"crypt:{name}"
    if _SYSTEM_ONLY.fullmatch(stored):
        return "crypt:system"
    return "plain" if plain_ok and stored else None


def preload() -> None:
    """Import every hash handler, its backend and crypt(3) now.

    Called while still root, before workers fork: an unprivileged worker may be unable to
    read the interpreter's files (a Python under /root), and forked workers then share
    the loaded code instead of each importing it on its first login.
    """
    names = {s.handler for s in SCHEMES.values() if s.handler} | set(BARE_HANDLERS) | set(CRYPT_HANDLERS)
    for name in sorted(names):
        handler = getattr(passlib_hash, name)
        get_backend = getattr(handler, "get_backend", None)
        if get_backend is not None:
            try:
                get_backend()
            except passlib_exc.MissingBackendError:
                log.debug("no backend for %s: those hashes will be refused", name)
    try:
        _crypt_module()
    except ImportError as e:
        log.warning("%s", e)


def _crypt_module() -> ModuleType:
    """The crypt(3) binding: stdlib ``crypt`` before Python 3.13, the ``crypt_r`` package after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if sys.version_info >= (3, 13):
            try:
                import crypt_r as module  # type: ignore[import-not-found]
            except ImportError as e:
                raise ImportError(
                    "system crypt(3) needs the crypt-r package on Python 3.13+: pip install crypt-r"
                ) from e
        else:
            import crypt as module
    return module


def _system_crypt(secret: bytes, stored: str) -> str | None:
    """crypt(3) of ``secret`` with ``stored`` as setting; None when it cannot be computed."""
    try:
        word = secret.decode("utf-8")  # the binding encodes text as UTF-8; other bytes can't pass
    except UnicodeDecodeError:
        log.debug("password is not UTF-8: crypt(3) cannot be asked")
        return None
    try:
        result = _crypt_module().crypt(word, stored)
    except (ValueError, OSError):  # NUL in the password, an unsupported setting
        return None
    if not result or result.startswith("*"):  # "*0"/"*1": crypt(3)'s failure tokens
        return None
    return str(result)


def crypt_verify(secret: bytes, stored: str) -> bool:
    """Check ``secret`` against a crypt(3) hash with the system's libcrypt.

    This is the Passwd backend's check: libxcrypt knows every format ``/etc/shadow``
    may hold, yescrypt (``$y$``, Debian 12's default) included, which passlib cannot
    compute. Locked (``!``/``*``) and empty hashes never match.
    """
    if not stored or stored[0] in "!*":
        return False
    result = _system_crypt(secret, stored)
    if result is None:
        return False
    return hmac.compare_digest(
        result.encode("utf-8", "surrogateescape"), stored.encode("utf-8", "surrogateescape")
    )


def _passlib_verify(handler_name: str, secret: bytes, value: str) -> bool:
    """passlib's verify; ValueError (malformed hash) propagates, secret problems are False."""
    handler = _handler(handler_name)
    if handler_name == "bcrypt":
        secret = secret[:_BCRYPT_MAX]
    try:
        return bool(handler.verify(secret, value))  # type: ignore[attr-defined]
    except passlib_exc.PasswordValueError:  # NUL bytes, oversized secret: cannot match
        return False


def _verify_crypt(scheme_name: str, handler_name: str | None, secret: bytes, body: str) -> bool:
    """A crypt(3)-style hash: passlib when it knows the format, else the system's crypt(3)."""
    names = (handler_name,) if handler_name else CRYPT_HANDLERS
    for name in names:
        if _handler(name).identify(body):  # type: ignore[attr-defined]
            try:
                return _passlib_verify(name, secret, body)
            except passlib_exc.MissingBackendError:
                log.warning("password scheme %s: passlib has no backend for %s", escape(scheme_name), name)
                return False
            except ValueError:
                break  # passlib finds it malformed (e.g. rounds < 1000); crypt(3) may not
    if not body or body[0] in "!*":
        return False
    result = _system_crypt(secret, body)
    if result is None:
        if b"\0" not in secret and _is_utf8(secret):
            log.warning("malformed or unsupported %s hash in a stored password", escape(scheme_name))
        return False
    return hmac.compare_digest(
        result.encode("utf-8", "surrogateescape"), body.encode("utf-8", "surrogateescape")
    )


def _is_utf8(data: bytes) -> bool:
    """Whether ``data`` decodes as UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _verify_ldap(scheme_name: str, scheme: _Scheme, encoding: str, secret: bytes, body: str) -> bool:
    """``base64(digest [+ salt])`` schemes: passlib's ldap_* handler, hashlib for what it refuses."""
    try:
        raw = bytes.fromhex(body) if encoding == "HEX" else base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        log.warning("malformed %s value in a stored password", escape(scheme_name))
        return False
    assert scheme.digest is not None
    size = hashlib.new(scheme.digest).digest_size
    if len(raw) < size or (scheme.salted and len(raw) == size) or (not scheme.salted and len(raw) != size):
        log.warning("malformed %s value in a stored password (length)", escape(scheme_name))
        return False
    if scheme.handler and scheme.ident:
        try:
            return _passlib_verify(
                scheme.handler, secret, scheme.ident + base64.b64encode(raw).decode("ascii")
            )
        except ValueError:
            pass  # salt length outside passlib's 4..16 bytes: Dovecot accepts any
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(hashlib.new(scheme.digest, secret + salt).digest(), digest)


def _plain_trunc_ok(secret: bytes, body: bytes) -> bool:
    """Dovecot's PLAIN-TRUNC: ``<length>-<password>``.

    A stored value cut at ``length`` matches any longer secret with that prefix.
    """
    length_text, dash, stored = body.partition(b"-")
    if not dash or not length_text.isdigit():
        log.warning("malformed PLAIN-TRUNC value in a stored password")
        return False
    length = int(length_text)
    if len(stored) == length and len(secret) >= length:
        return hmac.compare_digest(secret[:length], stored)
    return hmac.compare_digest(secret, stored)


def _decode_plain(body: str, encoding: str) -> bytes | None:
    """The clear-text bytes of a ``{PLAIN}`` body (``{PLAIN.B64}`` decoded)."""
    if encoding == "B64":
        try:
            return base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            log.warning("malformed PLAIN.B64 value in a stored password")
            return None
    return body.encode("utf-8", "surrogateescape")


def verify_password(secret: bytes, stored: str, *, plain_ok: bool = False) -> bool:
    """Whether ``secret`` matches ``stored`` (``{SCHEME}value``, a bare crypt hash, or plain text).

    Bare plain text (no prefix and not a recognised hash) is compared only when
    ``plain_ok`` (the MySQL backend's legacy rows); otherwise it never matches and a
    log line says the entry needs a ``{PLAIN}`` prefix. An unknown scheme never
    matches and is logged by name. Malformed hashes never match.
    """
    split = _split_scheme(stored)
    if split is None:
        name = _bare_handler(stored, strict=plain_ok)
        if name is not None:
            return _verify_crypt(name, name, secret, stored)
        if stored.startswith("$") and _SYSTEM_ONLY.fullmatch(stored):
            return crypt_verify(secret, stored)
        if plain_ok and stored:
            return hmac.compare_digest(secret, stored.encode("utf-8", "surrogateescape"))
        log.warning("stored password is neither {SCHEME}-prefixed nor a recognised crypt hash")
        return False
    scheme_name, body = split
    resolved = _resolve(scheme_name)
    if resolved is None:
        log.warning("unknown password scheme {%s}", escape(scheme_name))
        return False
    scheme, encoding = resolved
    if scheme.kind == "plain":
        clear = _decode_plain(body, encoding)
        return clear is not None and hmac.compare_digest(secret, clear)
    if scheme.kind == "plain-trunc":
        return _plain_trunc_ok(secret, body.encode("utf-8", "surrogateescape"))
    if scheme.kind == "crypt":
        return _verify_crypt(scheme_name, scheme.handler, secret, body)
    if scheme.kind == "ldap":
        return _verify_ldap(scheme_name, scheme, encoding, secret, body)
    if scheme.kind == "scram":
        try:
            stored_credentials = credentials.parse_dovecot_scram(body)
        except ValueError as e:  # the message names what is wrong, never the value
            log.warning("malformed SCRAM-SHA-256 value in a stored password: %s", e)
            return False
        return credentials.scram_verify(secret, stored_credentials)
    assert scheme.handler is not None
    try:
        return _passlib_verify(scheme.handler, secret, body.lower() if scheme.kind == "hex" else body)
    except passlib_exc.MissingBackendError:
        log.warning("password scheme %s unavailable: passlib has no backend for it", escape(scheme_name))
    except ValueError:
        log.warning("malformed %s hash in a stored password", escape(scheme_name))
    return False


def dummy_verify(secret: bytes, template: str | None = None, *, plain_ok: bool = False) -> None:
    """Spend the CPU of a real check and discard the result: the work done for a login
    that has no (usable) stored password, so "no such user" and "wrong password" take the
    same time and cannot be told apart.

    ``template`` is a stored value of the scheme and cost the backend's real users have
    (:class:`SchemeTally`); checking the secret against it costs exactly what checking a
    real user of that kind costs (bcrypt cost 12 stays bcrypt cost 12, argon2 keeps its
    memory and time cost, yescrypt goes to crypt(3)). The result is thrown away, so whose
    value it is does not matter. Without a template: sha512-crypt with 5000 rounds, the
    common default. Never raises: a template that cannot be computed here (yescrypt
    without a crypt(3) binding, as on Python 3.13 without ``crypt_r``) falls back to
    the default.
    """
    if template is not None:
        try:
            verify_password(secret, template, plain_ok=plain_ok)
            return
        except Exception:  # noqa: BLE001 - a dummy must never fail a login differently
            pass
    try:
        passlib_hash.sha512_crypt.verify(secret, _DUMMY_SHA512)
    except (ValueError, TypeError):  # NUL in the secret: real checks refuse it as fast
        pass


def dummy_crypt_verify(secret: bytes) -> None:
    """Like :func:`dummy_verify`, but with crypt(3) and yescrypt: the twin of a Debian 12 system account.

    Falls back to :func:`dummy_verify` when this libcrypt has no yescrypt or there is no
    crypt(3) binding at all (Python 3.13 without ``crypt_r``): it never raises.
    """
    try:
        result = _system_crypt(secret, _DUMMY_YESCRYPT)
    except ImportError:
        result = None
    if result is None:
        dummy_verify(secret)


#: Runs of salt/digest characters: left out of a stored value to leave its scheme and cost.
_SALT_OR_DIGEST = re.compile(r"[./A-Za-z0-9+=]{16,}")


def cost_class(stored: str, *, plain_ok: bool = False) -> str | None:
    """The scheme and cost settings of a stored value, salt and digest left out
    (``crypt:bcrypt:$2b$12$``, ``SHA512-CRYPT:{SHA512-CRYPT}$6$rounds=10000$$``); ``"plain"``
    for clear text; None when it cannot be checked at all."""
    scheme = identify(stored, plain_ok=plain_ok)
    if scheme is None:
        return None
    if scheme == "plain" or plain_secret(stored, plain_ok=plain_ok) is not None:
        return "plain"
    return f"{scheme}:{_SALT_OR_DIGEST.sub('', stored)}"


class SchemeTally:
    """Which scheme and cost most of a backend's stored passwords use, for :func:`dummy_verify`.

    ``add()`` every stored value seen (File: the whole file at each load; MySQL: each
    row it looks up); :meth:`template` is one value of the most common hashed kind. Clear
    text is not counted: a failed clear-text check pays the dummy too, so it should cost
    what the hashed users cost.
    """

    def __init__(self, plain_ok: bool = False) -> None:
        self._plain_ok = plain_ok
        self._counts: dict[str, int] = {}
        self._examples: dict[str, str] = {}
        self._best: str | None = None

    def add(self, stored: str) -> None:
        kind = cost_class(stored, plain_ok=self._plain_ok)
        if kind is None or kind == "plain":
            return
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._examples.setdefault(kind, stored)
        if self._best is None or self._counts[kind] > self._counts[self._best]:
            self._best = kind

    def template(self) -> str | None:
        """A stored value of the majority scheme and cost; None before any hashed value."""
        return None if self._best is None else self._examples[self._best]


def plain_secret(stored: str, *, plain_ok: bool = False) -> str | None:
    """The clear text of a stored password, for APOP: ``{PLAIN}x``/``{CLEARTEXT}x`` -> ``x``.

    Bare plain text counts only when ``plain_ok``. Hashes (and PLAIN-TRUNC, which may
    be cut short) give None: APOP cannot work for them.
    """
    split = _split_scheme(stored)
    if split is None:
        return stored if identify(stored, plain_ok=plain_ok) == "plain" else None
    resolved = _resolve(split[0])
    if resolved is None or resolved[0].kind != "plain":
        return None
    clear = _decode_plain(split[1], resolved[1])
    return None if clear is None else clear.decode("utf-8", "surrogateescape")


def apop_digest_ok(timestamp: str, secret: str, digest: str) -> bool:
    """Whether ``digest`` is MD5(timestamp + secret) in hex (RFC 1939 section 7), compared in constant time."""
    expected = hashlib.md5(
        (timestamp + secret).encode("utf-8", "surrogateescape"), usedforsecurity=False
    ).hexdigest()
    given = digest.strip().lower().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected.encode("ascii"), given)


def scram_secret(stored: str) -> credentials.ScramCredentials | None:
    """The SCRAM-SHA-256 credentials of a stored ``{SCRAM-SHA-256}`` value (Dovecot's
    format), for AUTH SCRAM-SHA-256; None for any other scheme or a malformed value."""
    split = _split_scheme(stored)
    if split is None or split[0] != "SCRAM-SHA-256":
        return None
    try:
        return credentials.parse_dovecot_scram(split[1])
    except ValueError:
        return None
