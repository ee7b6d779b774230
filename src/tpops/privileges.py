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

Local users are hostile. When the authenticator names no owner, the owner is taken
from the Maildir directory itself, opened with ``O_NOFOLLOW`` on its last component
(and no symlink on the way unless root's), by ``fstat`` of that descriptor: a
``~/Maildir`` symlink to another user's Maildir is refused, not served as that user.
The descriptor is handed to the session, so its later lookups start from the very
directory the decision was made on. A per-session identity must have a uid in
``$first_valid_uid``..``$last_valid_uid`` and a gid other than 0, and after the drop
the Maildir must belong to the effective uid.

A session that would be served as uid 0, or that fails one of these checks, is
refused (``-ERR [SYS/PERM]``).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from tpops.auth.base import MailUser
from tpops.mailbox.maildir import MaildirRoot, UnsafeMaildir, open_root

#: Dovecot's default: the system accounts below it never own a mailbox.
DEFAULT_FIRST_VALID_UID = 500


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


def _open(path: str, *, follow_last: bool) -> MaildirRoot:
    """:func:`open_root`, with an unsafe layout turned into a refusal."""
    try:
        return open_root(path, follow_last=follow_last)
    except UnsafeMaildir as exc:
        raise Refused(f"{path}: {exc.strerror}") from None


def mailbox_owner(user: MailUser) -> tuple[Identity, MaildirRoot | None]:
    """The identity to serve ``user`` as: the authenticator's ids, else the Maildir's owner.

    When the owner comes from the Maildir, the directory is opened here (as root,
    not following a symlink as its last component) and returned with the identity, so
    the caller serves exactly the directory whose owner it took; a missing Maildir
    takes its nearest existing ancestor's owner (the mailbox is then empty).
    """
    uid, gid = user.uid, user.gid
    if uid is not None and gid is not None:
        return Identity(uid, gid), None
    root = _open(user.maildir, follow_last=False)
    return Identity(root.stat.st_uid if uid is None else uid, root.stat.st_gid if gid is None else gid), root


def check_identity(identity: Identity, first_valid_uid: int, last_valid_uid: int) -> None:
    """Refuse a per-session identity: uid 0 or gid 0, or a uid outside the valid range
    (``last_valid_uid`` 0 means no upper bound)."""
    if identity.uid == 0:
        raise Refused("would serve the mailbox as root (uid 0)")
    if identity.gid == 0:
        raise Refused("would serve the mailbox with the root group (gid 0)")
    if identity.uid < first_valid_uid or (last_valid_uid and identity.uid > last_valid_uid):
        upper = last_valid_uid or "unlimited"
        raise Refused(f"uid {identity.uid} is outside $first_valid_uid..$last_valid_uid ({first_valid_uid}..{upper})")


class SessionPrivileges:
    """The worker's ``serve_as`` hook: what to do once a session has authenticated.

    After a per-session switch it holds the Maildir opened for the identity decision
    (or reopened as the new identity); :func:`maildir_root` hands it to the session.
    """

    def __init__(
        self,
        switch_per_session: bool,
        *,
        first_valid_uid: int = DEFAULT_FIRST_VALID_UID,
        last_valid_uid: int = 0,
    ) -> None:
        self.switch_per_session = switch_per_session
        self.first_valid_uid = first_valid_uid
        self.last_valid_uid = last_valid_uid
        #: Set as soon as an identity change starts: this process can never serve again.
        self.changed = False
        #: The Maildir of the session just switched to, until :meth:`take_root`.
        self.root: MaildirRoot | None = None

    def __call__(self, user: MailUser) -> bool:
        """Switch to the mailbox owner when running as root; True if the process changed identity."""
        if not self.switch_per_session:
            if os.geteuid() == 0:
                raise Refused("would serve the mailbox as root")
            return False
        if self.changed:  # an earlier drop failed half-way: never open a mailbox here
            raise Refused("this process already changed its identity", final=True)
        identity, root = mailbox_owner(user)
        check_identity(identity, self.first_valid_uid, self.last_valid_uid)
        self.changed = True
        try:
            become(identity)
        except OSError as exc:
            raise Refused(f"cannot switch to uid {identity.uid} gid {identity.gid}: {exc}", final=True) from exc
        try:
            if root is None:  # the backend named the owner: open the Maildir as that owner
                root = _open(user.maildir, follow_last=True)
            if root.exists and root.stat.st_uid != os.geteuid():
                raise Refused(f"{user.maildir} belongs to uid {root.stat.st_uid}, not to uid {os.geteuid()}")
        except Refused as exc:  # the identity is changed: this process serves nobody else
            raise Refused(str(exc), final=True) from None
        self.root = root
        return True

    def take_root(self, user: MailUser) -> MaildirRoot | None:
        """The Maildir opened by the switch for ``user``, once; None if there is none."""
        root, self.root = self.root, None
        if root is not None and root.path != user.maildir:
            root.close()
            return None
        return root


def maildir_root(serve_as: object, user: MailUser) -> MaildirRoot:
    """The session's Maildir, opened: the one the identity switch decided on, else opened
    now as the current identity (symlinks of root or of this identity are followed).

    Raises :class:`Refused` for an unsafe layout, OSError when it cannot be opened.
    """
    root = serve_as.take_root(user) if isinstance(serve_as, SessionPrivileges) else None
    return root if root is not None else _open(user.maildir, follow_last=True)
