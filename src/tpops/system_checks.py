"""Checks of a configuration against this host, for ``--check-config``: users, groups, log paths.

:func:`tpops.config.check_config` looks at the values alone; these look at the
system, the way start-up would: the ``$user``/``$group`` the workers would run as
must exist (and not be root), and the files tpops would create (``$error_log``,
``$access_log``, ``$pid_file``) must lie in existing directories. Each problem
comes with the parameters to blame, so the caller can say ``FILE:LINE: ...``
(:meth:`tpops.config.ConfigFile.blame`).
"""

from __future__ import annotations

import os

from tpops.config import Config
from tpops.privileges import lookup_identity

Problem = tuple[tuple[str, ...], str]


def _identity_problems(config: Config) -> list[Problem]:
    """``$user``/``$group`` as the worker boot resolves them (tpops.worker.boot_privileges)."""
    if config.user is None:
        return []
    try:
        identity = lookup_identity(config.user, config.group)
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("no such group"):
            return [(("group",), f"$group: {reason}")]
        if config.group is None and not reason.startswith("no such user"):
            return [(("user", "group"), f"$user: {reason}")]  # a bare uid: it needs $group
        return [(("user",), f"$user: {reason}")]
    if identity.uid == 0:
        return [(("user",), (f"$user: {config.user!r} is root; workers never run as root "
                            f"(use nil to switch to each mailbox owner instead)"))]
    return []


def _path_problems(config: Config) -> list[Problem]:
    """Files tpops creates at start-up must have an existing parent directory."""
    out: list[Problem] = []
    for name in ("error_log", "access_log", "pid_file"):
        path = getattr(config, name)
        if not path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            out.append(((name,), f"${name}: directory {directory} {what}"))
    return out


def system_problems(config: Config) -> list[Problem]:
    """Every problem this host has with ``config``, as (parameters involved, message)."""
    return _identity_problems(config) + _path_problems(config)
