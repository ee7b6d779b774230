"""Authentication backends and the factory that picks one from ``$auth_type``.

``Passwd`` (the default: system accounts), ``MySQL`` (a user table) and ``File``
(a Dovecot-style passwd-file); see :mod:`tpops.auth.base` for the contract they
share. Backends are imported only when chosen, so ``mysqlclient`` and
``berkeleydb`` stay optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpops.auth.base import (
    Authenticator,
    AuthUnavailable,
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


def make_authenticator(config: Config) -> Authenticator:
    """The backend ``config.auth_type`` names, built from ``config``.

    Raises ValueError for an unknown type or an unusable setting (a bad
    ``$mysql_auth_query``, File without ``$auth_file``), ImportError with an install
    hint when MySQL is chosen without ``mysqlclient``. Nothing is connected or read
    here: backends open their files/connections at first use (in the worker).
    """
    kind = config.auth_type  # exactly as config.py validates it: 'Passwd', 'File', 'MySQL'
    if kind == "Passwd":
        from tpops.auth.passwd import PasswdAuthenticator

        return PasswdAuthenticator(config)
    if kind == "File":
        from tpops.auth.file import FileAuthenticator

        return FileAuthenticator(config)
    if kind == "MySQL":
        try:
            from tpops.auth.mysql import MySQLAuthenticator
        except ImportError as e:
            if not (e.name or "").startswith("MySQLdb"):
                raise
            raise ImportError(
                "$auth_type 'MySQL' needs the mysqlclient package: pip install 'tpops[mysql]'"
            ) from e
        return MySQLAuthenticator(config)
    raise ValueError(f"unknown $auth_type {config.auth_type!r}: use one of {', '.join(AUTH_TYPES)}")
