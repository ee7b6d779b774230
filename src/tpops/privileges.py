"""The privilege ladder: who a worker and a session run as.

- Not root: everything runs as the invoking user; nothing changes.
- Root with ``--user``/``--group`` (``$user``/``$group``): the worker drops to that
  identity for good when it starts (the virtual-mail set-up: one ``vmail`` owns all
  Maildirs); sessions are served as it.
- Root without ``--user``: the worker authenticates as root (it may need
  ``/etc/shadow``), then, before the Maildir is opened, drops for good to the mailbox
  owner the authenticator names (or the Maildir's owner when it names none) —
  supplementary groups cleared; real, effective and saved ids set. The worker then
  ends after that session, since it can never be root again.

A session that would be served as uid 0 is refused (``-ERR [SYS/PERM]``).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from tpops.auth.base import MailUser


class Refused(Exception):
    """This session must not be served (it would run as root, or has no owner).

    ``final`` is True when the process can serve nobody else either (an identity switch
    failed half-way): the session then closes the connection.
    """

    def __init__(self, reason: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.final = final


@dataclass(frozen=True, slots=True)
class Identity:
    """A system identity to run as."""

    uid: int
    gid: int


def lookup_identity(user: str, group: str | None) -> Identity:
    """``--user``/``--group`` names or numbers to ids; the user's primary group by default."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        if user.isdigit():
            uid, gid = int(user), None
        else:
            raise ValueError(f"no such user: {user}") from None
    else:
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group: {group}") from None
    if gid is None:
        raise ValueError(f"user {user} has no passwd entry: give --group too")
    return Identity(uid, gid)


def become(identity: Identity) -> None:
    """Drop to ``identity`` for good: groups cleared, real/effective/saved ids set."""
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise OSError("privilege drop did not take effect")


def mailbox_owner(user: MailUser) -> Identity:
    """The identity to serve ``user`` as: the authenticator's ids, else the Maildir's owner."""
    uid, gid = user.uid, user.gid
    if uid is None or gid is None:
        path = user.maildir.rstrip("/") or "/"
        while True:
            try:
                st = os.stat(path)
                break
            except FileNotFoundError:
                parent = os.path.dirname(path)
                if parent == path:
                    raise Refused(f"no owner for {user.maildir}") from None
                path = parent
        uid = st.st_uid if uid is None else uid
        gid = st.st_gid if gid is None else gid
    return Identity(uid, gid)


class SessionPrivileges:
    """The worker's ``serve_as`` hook: what to do once a session has authenticated."""

    def __init__(self, switch_per_session: bool) -> None:
        self.switch_per_session = switch_per_session
        #: Set as soon as an identity change starts: this process can never serve again.
        self.changed = False

    def __call__(self, user: MailUser) -> bool:
        """Switch to the mailbox owner when running as root; True if the process changed identity."""
        if not self.switch_per_session:
            if os.geteuid() == 0:
                raise Refused("would serve the mailbox as root")
            return False
        if self.changed:  # an earlier drop failed half-way: never open a mailbox here
            raise Refused("this process already changed its identity", final=True)
        identity = mailbox_owner(user)
        if identity.uid == 0:
            raise Refused("would serve the mailbox as root (uid 0)")
        self.changed = True
        try:
            become(identity)
        except OSError as exc:
            raise Refused(f"cannot switch to uid {identity.uid} gid {identity.gid}: {exc}", final=True) from exc
        return True
