"""Authentication backends and the factory that picks one from ``$auth_type``.

``Passwd`` (the default: system accounts), ``MySQL`` (a user table) and ``File``
(a Dovecot-style passwd-file); see :mod:`tpops.auth.base` for the contract they
share. Backends are imported only when chosen, so ``mysqlclient`` and
``berkeleydb`` stay optional.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from tpops.auth.base import (
    Authenticator,
    AuthUnavailable,
    LockingAuthenticator,
    MailboxInUse,
    MailboxLock,
    MailUser,
    apply_default_domain,
)
from tpops.config import AUTH_TYPES  # one list of the accepted $auth_type values

if TYPE_CHECKING:
    from tpops.config import Config

__all__ = [
    "AUTH_TYPES",
    "AuthUnavailable",
    "Authenticator",
    "MailUser",
    "MailboxInUse",
    "MailboxLock",
    "apply_default_domain",
    "make_authenticator",
]


def _mysql_module() -> ModuleType:
    """:mod:`tpops.auth.mysql`, or ImportError with an install hint when mysqlclient is missing."""
    try:
        import tpops.auth.mysql
    except ImportError as e:
        if not (e.name or "").startswith("MySQLdb"):
            raise
        raise ImportError(
            "$auth_type 'MySQL' and $mailbox_lock 'mysql' need the mysqlclient package: pip install 'tpops[mysql]'"
        ) from e
    return tpops.auth.mysql


def make_authenticator(config: Config) -> Authenticator:
    """The backend ``config.auth_type`` names, built from ``config``.

    Raises ValueError for an unknown type or an unusable setting (a bad
    ``$mysql_auth_query``, File without ``$auth_file``), ImportError with an install
    hint when MySQL is chosen without ``mysqlclient``. Nothing is connected or read
    here: backends open their files/connections at first use (in the worker).
    """
    kind = config.auth_type  # exactly as config.py validates it: 'Passwd', 'File', 'MySQL'
    if kind in ("Passwd", "File"):
        backend: LockingAuthenticator
        if kind == "Passwd":
            from tpops.auth.passwd import PasswdAuthenticator

            backend = PasswdAuthenticator(config)
        else:
            from tpops.auth.file import FileAuthenticator

            backend = FileAuthenticator(config)
        if backend.lock_kind == "mysql":  # GET_LOCK for a backend without a database of its own
            backend.use_lock_connection(_mysql_module().MySQLConnection(config))
        return backend
    if kind == "MySQL":
        authenticator: Authenticator = _mysql_module().MySQLAuthenticator(config)
        return authenticator
    raise ValueError(f"unknown $auth_type {config.auth_type!r}: use one of {', '.join(AUTH_TYPES)}")
