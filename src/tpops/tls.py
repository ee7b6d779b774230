"""TLS for POP3: the server SSLContext built from tpops.conf, and helpers for logs and SCRAM.

What this module provides (the session and the master plug it in; nothing here reads
sockets by itself):

:func:`tls_from_config` / :func:`load_server_tls`
    Build a :class:`ServerTLS` (an :class:`ssl.SSLContext` plus what the session needs
    about the certificate) from ``$tls_cert_file``, ``$tls_key_file``,
    ``$tls_min_version`` and ``$tls_ciphers``. Every problem raises
    :class:`TLSConfigError` whose message reads ```FILE: what is wrong`` in plain words
    (OpenSSL's ``[SSL: KEY_VALUES_MISMATCH]`` becomes "the private key does not match
    the certificate in CERT"), so the master can report it at start-up, before it
    detaches, and keep the running context when a reload fails.
:func:`describe_session`
    ``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for the ``login:`` log line.
:func:`describe_handshake_error`
    Why a handshake failed, in words an admin can act on (a plain-text client on the
    TLS port, no common protocol version, the client does not trust the certificate).
:func:`server_end_point`
    The RFC 5929 ``tls-server-end-point`` channel-binding data of a certificate, for
    SCRAM-SHA-256-PLUS (:attr:`ServerTLS.end_point` holds it for the served one).

Session resumption across workers
---------------------------------
The context must be created **once, in the master, before the workers fork**. OpenSSL
generates the session-ticket encryption keys when the ``SSL_CTX`` is created and keeps
them in it; a forked worker inherits that memory, so every worker encrypts and decrypts
tickets with the same keys and a client that resumes with a ticket issued by worker A
is resumed by worker B. This only works with *stateless* tickets: OpenSSL's server-side
session cache is per process, which is why ``OP_NO_TICKET`` must stay clear (with it
set, TLS 1.3 falls back to stateful tickets that only the issuing worker knows).
:func:`load_server_tls` clears it explicitly and keeps ``num_tickets`` at
:data:`TICKETS_PER_HANDSHAKE`. A reload builds a new context, hence new ticket keys:
tickets issued before a reload are refused and those clients do one full handshake.

The private key is read while still root (it may be readable by root only); workers
never reopen the files. A worker that later drops privileges keeps the key in memory,
but a process whose credentials changed is not dumpable, so the mailbox owner cannot
ptrace it.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from typing import Protocol

from asn1crypto import pem as _pem  # a dependency of scramp; parses certificates without OpenSSL
from asn1crypto import x509 as _x509

__all__ = [
    "ALPN_POP3",
    "MIN_VERSIONS",
    "TICKETS_PER_HANDSHAKE",
    "ServerTLS",
    "TLSConfigError",
    "TLSSettings",
    "describe_handshake_error",
    "describe_session",
    "load_server_tls",
    "parse_min_version",
    "server_end_point",
    "tls_from_config",
]

#: Accepted ``$tls_min_version`` values (after :func:`_version_key` normalisation).
MIN_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
#: Versions a server on the Internet must not accept (RFC 8996 deprecates TLS 1.0/1.1).
_OBSOLETE = {"1.0": ("TLSv1", "RFC 8996"), "1": ("TLSv1", "RFC 8996"),
             "1.1": ("TLSv1.1", "RFC 8996"), "ssl3": ("SSLv3", "RFC 7568"),
             "ssl3.0": ("SSLv3", "RFC 7568"), "ssl2": ("SSLv2", "RFC 6176"),
             "ssl2.0": ("SSLv2", "RFC 6176")}

#: TLS 1.3 tickets sent after each full handshake (OpenSSL's default is 2 as well):
#: a client opening two connections can resume both.
TICKETS_PER_HANDSHAKE = 2

#: ALPN protocol id of POP3 (IANA registry); offering it lets a client that sends ALPN
#: detect a cross-protocol redirection (the ALPACA attack).
ALPN_POP3 = "pop3"


class TLSConfigError(Exception):
    """The TLS settings cannot be used; the message reads ``FILE: what is wrong``
    (or ``$parameter: what is wrong`` for a value that is not a file)."""


@dataclass(frozen=True)
class ServerTLS:
    """A loaded server certificate: the context to wrap sockets with and facts about it.

    ``context``
        The server :class:`ssl.SSLContext`; wrap an accepted socket with
        ``context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)``
        and call ``do_handshake()`` under ``$command_timeout``.
    ``cert_file``, ``key_file``
        The files it was loaded from (for log lines).
    ``end_point``
        ``tls-server-end-point`` channel-binding data (RFC 5929) of the leaf certificate,
        or ``None`` when the certificate's signature algorithm defines none (Ed25519):
        then SCRAM-SHA-256-PLUS must not be offered.
    ``subject``
        The certificate's subject and validity, one line for the start-up log.
    """

    context: ssl.SSLContext
    cert_file: str
    key_file: str
    end_point: bytes | None
    subject: str


# ---------------------------------------------------------------- settings

def _version_key(value: str) -> str:
    """``'TLSv1.2'``, ``'TLS1_2'``, ``'tls 1.2'``, ``'1.2'`` -> ``'1.2'`` (``'SSLv3'`` -> ``'ssl3'``)."""
    key = re.sub(r"[\s_]+", ".", value.strip().lower()).replace("v", "")
    key = re.sub(r"^tls\.?", "", key)
    return key.strip(".")


def parse_min_version(value: str) -> ssl.TLSVersion:
    """The :class:`ssl.TLSVersion` a ``$tls_min_version`` value names.

    Accepts ``TLSv1.2``/``TLSv1.3`` in any case and the usual spellings (``TLS1.2``,
    ``TLSv1_2``, ``TLS 1.3``, ``1.2``). Raises :class:`TLSConfigError` for anything
    else, naming obsolete versions as such rather than as unknown words.
    """
    key = _version_key(value)
    if key in MIN_VERSIONS:
        return MIN_VERSIONS[key]
    if key in _OBSOLETE:
        name, rfc = _OBSOLETE[key]
        raise TLSConfigError(
            f"$tls_min_version: {name} is obsolete and insecure ({rfc}); "
            f"use 'TLSv1.2' or 'TLSv1.3'")
    raise TLSConfigError(f"$tls_min_version: unknown TLS version {value!r}; "
                         f"use 'TLSv1.2' or 'TLSv1.3'")


# ---------------------------------------------------------------- files

def _read(path: str, what: str) -> bytes:
    """The file's bytes, or :class:`TLSConfigError` saying why it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{path}: is a directory, not a {what} file") from None
    except PermissionError:
        raise TLSConfigError(f"{path}: permission denied (tpops reads the {what} as the "
                             f"user it starts as, before dropping privileges)") from None
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _leaf_certificate(path: str, data: bytes) -> _x509.Certificate:
    """The first certificate of a PEM file (the leaf; a chain may follow)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = " (it holds a private key: swap $tls_cert_file and $tls_key_file?)" \
            if b"PRIVATE KEY-----" in data else ""
        raise TLSConfigError(f"{path}: not a PEM certificate: no '-----BEGIN CERTIFICATE-----' "
                             f"line{hint}")
    try:
        for kind, _headers, der in _pem.unarmor(data, multiple=True):
            if kind == "CERTIFICATE":
                cert = _x509.Certificate.load(der, strict=True)
                cert.native  # noqa: B018  # parse it all now: a broken one fails here
                return cert
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{path}: the PEM certificate is damaged ({e})") from None
    raise TLSConfigError(f"{path}: no certificate found")  # pragma: no cover


def _check_key_text(path: str, data: bytes) -> None:
    """Refuse what OpenSSL would refuse with an obscure message or a passphrase prompt."""
    if b"PRIVATE KEY-----" not in data:
        hint = " (it holds a certificate: set $tls_key_file to the key's file)" \
            if b"-----BEGIN CERTIFICATE-----" in data else ""
        raise TLSConfigError(f"{path}: not a PEM private key: no '-----BEGIN ... PRIVATE KEY-----' "
                             f"line{hint}")
    if b"ENCRYPTED" in data:
        raise TLSConfigError(f"{path}: the private key is protected by a passphrase; tpops needs "
                             f"an unencrypted key (make the file readable by root only)")


def server_end_point(cert_der: bytes) -> bytes | None:
    """RFC 5929 ``tls-server-end-point`` data: the certificate's DER hashed with the hash
    of its signature algorithm, SHA-256 if that is MD5 or SHA-1.

    ``None`` when the signature algorithm has no single hash (Ed25519, Ed448): RFC 5929
    defines no binding then, and SCRAM-...-PLUS must not be offered.
    """
    cert = _x509.Certificate.load(cert_der)
    try:
        name = cert.hash_algo
    except (ValueError, KeyError):
        return None
    if name in ("md5", "sha1"):
        name = "sha256"
    try:
        return hashlib.new(name, cert_der).digest()
    except ValueError:  # pragma: no cover - hashlib without that algorithm
        return None


def _subject(cert: _x509.Certificate) -> str:
    subject = cert.subject.human_friendly
    names = cert.valid_domains
    not_after = cert["tbs_certificate"]["validity"]["not_after"].native
    return (f"{subject}" + (f" for {', '.join(names)}" if names else "")
            + f", valid until {not_after:%Y-%m-%d %H:%M} UTC")


def _ssl_reason(e: ssl.SSLError) -> str:
    reason = getattr(e, "reason", None) or ""
    return str(reason).upper()


def load_server_tls(cert_file: str, key_file: str, *, min_version: str = "TLSv1.2",
                    ciphers: str | None = None) -> ServerTLS:
    """Load the certificate (chain) and key into a new server context.

    Call it in the master, as the user tpops starts as, before forking workers (see the
    module docstring for why). ``ciphers`` is an OpenSSL cipher string for TLS 1.2
    (TLS 1.3 suites are not affected by it); ``None`` keeps OpenSSL's secure default.
    Raises :class:`TLSConfigError`; nothing is half-loaded.
    """
    version = parse_min_version(min_version)
    cert_data = _read(cert_file, "certificate")
    leaf = _leaf_certificate(cert_file, cert_data)
    _check_key_text(key_file, _read(key_file, "private key"))

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # server side, no client certs
    context.minimum_version = version
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options &= ~ssl.OP_NO_TICKET  # stateless tickets: resumption works across workers
    context.num_tickets = TICKETS_PER_HANDSHAKE
    context.set_alpn_protocols([ALPN_POP3])
    if ciphers is not None:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TLSConfigError(f"$tls_ciphers: no cipher matches {ciphers!r} "
                                 f"(an OpenSSL cipher list, e.g. 'HIGH:!aNULL')") from None

    def no_passphrase() -> bytes:
        # Never let OpenSSL prompt on the terminal; _check_key_text refused encrypted keys.
        raise TLSConfigError(f"{key_file}: the private key is protected by a passphrase")

    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except TLSConfigError:
        raise
    except ssl.SSLError as e:
        reason = _ssl_reason(e)
        if "KEY_VALUES_MISMATCH" in reason or "X509_CHECK_PRIVATE_KEY" in reason:
            raise TLSConfigError(f"{key_file}: the private key does not match the certificate "
                                 f"in {cert_file}") from None
        if "EE_KEY_TOO_SMALL" in reason or "CA_MD_TOO_WEAK" in reason:
            raise TLSConfigError(f"{cert_file}: OpenSSL refuses this certificate as too weak "
                                 f"(key too small or MD5/SHA-1 signature)") from None
        if "CERT" in reason or "X509" in reason:
            raise TLSConfigError(f"{cert_file}: OpenSSL cannot use this certificate "
                                 f"({reason.lower().replace('_', ' ') or e})") from None
        raise TLSConfigError(f"{key_file}: not a usable PEM private key "
                             f"({reason.lower().replace('_', ' ') or e})") from None
    except OSError as e:  # raced with a file change since _read
        raise TLSConfigError(f"{cert_file}: {e.strerror or e}") from None
    return ServerTLS(context=context, cert_file=os.path.abspath(cert_file),
                     key_file=os.path.abspath(key_file),
                     end_point=server_end_point(leaf.dump()), subject=_subject(leaf))


class TLSSettings(Protocol):
    """The configuration values :func:`tls_from_config` reads (a :class:`tpops.config.Config`)."""

    @property
    def tls_cert_file(self) -> str | None: ...
    @property
    def tls_key_file(self) -> str | None: ...
    @property
    def tls_min_version(self) -> str: ...
    @property
    def tls_ciphers(self) -> str | None: ...


def tls_from_config(config: TLSSettings) -> ServerTLS | None:
    """:func:`load_server_tls` for the configured files, or ``None`` when no certificate
    is configured (TLS off). Raises :class:`TLSConfigError`."""
    if config.tls_cert_file is None:
        return None
    if config.tls_key_file is None:
        raise TLSConfigError("$tls_cert_file is set but $tls_key_file is not")
    return load_server_tls(config.tls_cert_file, config.tls_key_file,
                           min_version=config.tls_min_version, ciphers=config.tls_ciphers)


# ---------------------------------------------------------------- for the session

def describe_session(sock: ssl.SSLSocket | ssl.SSLObject) -> str:
    """Protocol version and cipher suite of an established connection, for the log:
    ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``."""
    cipher = sock.cipher()
    return f"{sock.version() or '?'} {cipher[0] if cipher else '?'}"


#: OpenSSL reason codes -> what an admin reads in the log after "TLS handshake failed: ".
_HANDSHAKE_REASONS: dict[str, str] = {
    "WRONG_VERSION_NUMBER": "the client did not send a TLS ClientHello "
                            "(a plain-text client on the TLS port?)",
    "HTTP_REQUEST": "the client sent an HTTP request",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below $tls_min_version",
    "NO_PROTOCOLS_AVAILABLE": "the client offers only TLS versions below $tls_min_version",
    "NO_SHARED_CIPHER": "no cipher suite in common with the client ($tls_ciphers)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected our certificate "
                                       "(wrong host name or incomplete chain?)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says our certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common with the client",
    "NO_APPLICATION_PROTOCOL": "the client asked for an ALPN protocol other than pop3",
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection during the handshake",
}


def describe_handshake_error(error: BaseException) -> str:
    """A failed server handshake (``SSLError``, ``TimeoutError``, ``OSError``) in plain words."""
    if isinstance(error, (TimeoutError, ssl.SSLZeroReturnError)) or \
            isinstance(error, OSError) and "timed out" in str(error):
        if isinstance(error, ssl.SSLZeroReturnError):
            return "the client closed the connection during the handshake"
        return "the client did not complete the handshake within $command_timeout"
    if isinstance(error, ssl.SSLEOFError):
        return "the client closed the connection during the handshake"
    if isinstance(error, ssl.SSLError):
        reason = _ssl_reason(error)
        if reason in _HANDSHAKE_REASONS:
            return _HANDSHAKE_REASONS[reason]
        return reason.lower().replace("_", " ") if reason else str(error)
    if isinstance(error, ConnectionError):
        return "the client closed the connection during the handshake"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)
