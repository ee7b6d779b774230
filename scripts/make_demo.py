#!/usr/bin/env python3
"""Create the tpops demo: a Maildir with a dozen realistic messages, a user file and a config.

Called by ``scripts/demo``; usable on its own::

    python3 scripts/make_demo.py [--dir DEMO_DIR] [--port N]

``DEMO_DIR`` (default ``demo/`` at the top of the repository, which git ignores) is
removed and created again, so every run starts from the same mailbox: message files,
names and dates are fixed, so the UIDLs are the same on every run.

What it writes::

    DEMO_DIR/tpops.conf   $auth_type 'File', logs, small worker pool
    DEMO_DIR/passwd       Dovecot-style passwd-file: user demo, password {PLAIN}demo
    DEMO_DIR/Maildir/     cur/ new/ tmp/ with the messages
    DEMO_DIR/lock/        $passwd_lock_dir (0700)
    DEMO_DIR/access.log   written by tpops at each logout

Run as root, tpops refuses to serve a mailbox as uid 0; the passwd-file leaves uid
and gid empty, so tpops serves the mailbox as the owner of the Maildir, and this
script gives the Maildir to ``nobody:nogroup``.  ``nobody`` must then be able to
reach the Maildir: if a directory above DEMO_DIR is not world-searchable (o+x), the
Maildir goes to a fresh world-searchable directory under the system temp dir
instead (recorded in DEMO_DIR/.maildir-home, removed on the next run) and the script
says so.

Uses only the standard library (it runs before the virtualenv is ready).
"""

from __future__ import annotations

import argparse
import base64
import grp
import os
import pwd
import random
import shutil
import stat
import struct
import sys
import tempfile
import zlib
from email.header import Header
from email.utils import formatdate

HOST = "mx1.example.org"  # the delivering host in the Maildir file names
DOMAIN = "example.org"
BASE_TIME = 1717390800  # 2024-06-03 05:00:00 UTC; messages follow at fixed offsets
MARKER = ".tpops-demo"  # marks a temp dir this script created (safe to remove)


# ---------------------------------------------------------------- messages

def date(t: int) -> str:
    return formatdate(t, usegmt=True).replace(" GMT", " +0000")


def received(t: int, helo: str, ip: str) -> str:
    return (f"Received: from {helo} ({helo} [{ip}])\n"
            f"\tby {HOST} (Postfix) with ESMTPS id 4Vt{t % 100000:05d}Xz\n"
            f"\tfor <demo@{DOMAIN}>; {date(t)}\n")


def msg_plain(t: int) -> bytes:
    return f"""\
Return-Path: <alice@example.net>
Delivered-To: demo@{DOMAIN}
{received(t, "mail.example.net", "192.0.2.25")}From: Alice Martin <alice@example.net>
To: Demo User <demo@{DOMAIN}>
Subject: Lunch on Thursday?
Date: {date(t - 40)}
Message-ID: <20240603050000.4711@mail.example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hi,

are you free for lunch on Thursday? The new place on Market Street
opened last week, and I hear the soup is worth the queue.

Twelve thirty at the usual corner?

Alice
""".encode("ascii")


def msg_alternative(t: int) -> bytes:
    return f"""\
Return-Path: <news@shop.example.com>
Delivered-To: demo@{DOMAIN}
{received(t, "out.shop.example.com", "198.51.100.7")}From: Example Shop <news@shop.example.com>
To: demo@{DOMAIN}
Subject: Your order #10442 has shipped
Date: {date(t - 12)}
Message-ID: <order-10442.shipped@shop.example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="=_alt_7f3a9c"

This is a multi-part message in MIME format.

--=_alt_7f3a9c
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello,

your order #10442 has shipped and should arrive within 3=E2=80=935 working=
 days.

  1 x  USB-C cable, 2 m           9.90 EUR
  1 x  Notebook, dotted, A5       6.50 EUR

Track your parcel: https://shop.example.com/track/10442

Thank you for shopping with us.

--=_alt_7f3a9c
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<!DOCTYPE html>
<html><head><meta charset=3D"utf-8"><title>Order shipped</title></head>
<body style=3D"font-family: sans-serif">
<p>Hello,</p>
<p>your order <b>#10442</b> has shipped and should arrive within
3=E2=80=935 working days.</p>
<table border=3D"0" cellpadding=3D"4">
<tr><td>1 &times;</td><td>USB-C cable, 2&nbsp;m</td><td align=3D"right">9.90&=
nbsp;EUR</td></tr>
<tr><td>1 &times;</td><td>Notebook, dotted, A5</td><td align=3D"right">6.50&=
nbsp;EUR</td></tr>
</table>
<p><a href=3D"https://shop.example.com/track/10442">Track your parcel</a></p>
<p>Thank you for shopping with us.</p>
</body></html>

--=_alt_7f3a9c--
""".encode("ascii")


def tiny_png(width: int = 48, height: int = 48) -> bytes:
    """A small gradient PNG, generated so the demo needs no binary files."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes((x * 255 // (width - 1), y * 255 // (height - 1), 160))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
            + chunk(b"IEND", b""))


def msg_attachment(t: int) -> bytes:
    png = base64.encodebytes(tiny_png()).decode("ascii")
    csv = base64.encodebytes(
        b"month,visitors,orders\n2024-03,10421,312\n2024-04,11873,355\n2024-05,12960,401\n"
    ).decode("ascii")
    return f"""\
Return-Path: <bob@example.net>
Delivered-To: demo@{DOMAIN}
{received(t, "mail.example.net", "192.0.2.25")}From: Bob Chen <bob@example.net>
To: Demo User <demo@{DOMAIN}>
Subject: Q2 figures and the new logo
Date: {date(t - 95)}
Message-ID: <CAB0b.q2.figures.88121@mail.example.net>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="------------mixed0042"

This is a multi-part message in MIME format.
--------------mixed0042
Content-Type: text/plain; charset=us-ascii; format=flowed
Content-Transfer-Encoding: 7bit

Hi,

attached are the visitor numbers for March to May and the logo
draft. Comments welcome before Friday.

Bob

--------------mixed0042
Content-Type: text/csv; charset=us-ascii; name="q2-figures.csv"
Content-Disposition: attachment; filename="q2-figures.csv"
Content-Transfer-Encoding: base64

{csv}
--------------mixed0042
Content-Type: image/png; name="logo-draft.png"
Content-Disposition: attachment; filename="logo-draft.png"
Content-Transfer-Encoding: base64

{png}
--------------mixed0042--
""".encode("ascii")


def msg_list(t: int) -> bytes:
    return f"""\
Return-Path: <python-dev-bounces+demo=example.org@lists.example.com>
Delivered-To: demo@{DOMAIN}
{received(t, "lists.example.com", "203.0.113.40")}From: Carol Diaz <carol@example.edu>
To: python-dev@lists.example.com
Subject: [dev] Re: Proposal: drop the legacy config loader
Date: {date(t - 300)}
Message-ID: <a1b2c3d4-carol@example.edu>
In-Reply-To: <99887766-dan@example.com>
References: <99887766-dan@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit
Precedence: list
List-Id: Development discussion <dev.lists.example.com>
List-Unsubscribe: <mailto:dev-leave@lists.example.com>,
 <https://lists.example.com/mailman/options/dev>
List-Archive: <https://lists.example.com/archives/dev/>
List-Post: <mailto:dev@lists.example.com>
List-Help: <mailto:dev-request@lists.example.com?subject=help>
List-Subscribe: <mailto:dev-join@lists.example.com>,
 <https://lists.example.com/mailman/listinfo/dev>
Sender: "dev" <dev-bounces@lists.example.com>
Errors-To: dev-bounces@lists.example.com

On Sun, Jun 2, 2024, Dan wrote:
> I'd like to remove the old loader in the next release. Objections?

No objection from me, as long as the new one still reads the old
files unchanged. We have a few hundred of them in production, and
nobody wants to touch those by hand.

Could we keep a warning for one release first?

Carol

_______________________________________________
dev mailing list
dev@lists.example.com
https://lists.example.com/mailman/listinfo/dev
""".encode("ascii")


def msg_iso2022jp(t: int) -> bytes:
    subject = Header("来週の打ち合わせについて", "iso-2022-jp").encode()
    sender = Header("山田 太郎", "iso-2022-jp").encode()
    body = (
        "デモさん\n"
        "\n"
        "お疲れさまです。山田です。\n"
        "\n"
        "来週の打ち合わせですが、水曜日の午後二時からでいかがでしょうか。\n"
        "会議室は三階の第二会議室を予約してあります。\n"
        "\n"
        "資料は前日までにお送りします。\n"
        "よろしくお願いいたします。\n"
        "\n"
        "山田\n"
    ).encode("iso-2022-jp")
    head = f"""\
Return-Path: <yamada@example.jp>
Delivered-To: demo@{DOMAIN}
{received(t, "smtp.example.jp", "192.0.2.80")}From: {sender} <yamada@example.jp>
To: demo@{DOMAIN}
Subject: {subject}
Date: {date(t - 20)}
Message-ID: <20240603.yamada.1234@example.jp>
MIME-Version: 1.0
Content-Type: text/plain; charset=ISO-2022-JP
Content-Transfer-Encoding: 7bit

""".encode("ascii")
    return head + body


def msg_utf8(t: int) -> bytes:
    subject = Header("Re: 来週の打ち合わせについて", "utf-8").encode()
    sender = Header("佐藤 花子", "utf-8").encode()
    return f"""\
Return-Path: <hanako@example.jp>
Delivered-To: demo@{DOMAIN}
{received(t, "smtp.example.jp", "192.0.2.81")}From: {sender} <hanako@example.jp>
To: demo@{DOMAIN}
Cc: yamada@example.jp
Subject: {subject}
Date: {date(t - 25)}
Message-ID: <20240603.hanako.5678@example.jp>
In-Reply-To: <20240603.yamada.1234@example.jp>
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: 8bit

山田さん、デモさん

佐藤です。水曜日の午後二時、私も参加できます。
議事録は私が取りますね。

— 佐藤 (UTF-8, 8bit: naïve café, 3–5 °C, €20)
""".encode("utf-8")


def msg_dots(t: int) -> bytes:
    # Lines starting with "." must be byte-stuffed on the wire (RFC 1939 3),
    # and a line that is only "." must not end the transfer early.
    return f"""\
Return-Path: <dan@example.com>
Delivered-To: demo@{DOMAIN}
{received(t, "mail.example.com", "198.51.100.20")}From: Dan Okafor <dan@example.com>
To: demo@{DOMAIN}
Subject: dotfiles cleanup (lines starting with a dot)
Date: {date(t - 60)}
Message-ID: <dotfiles-0603@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

These are the files I removed from the shared home:

.bashrc.orig
.profile~
..hidden-backup
...and the .cache directory.

The next line holds a single dot, as in an SMTP end of data:
.
and this one has two:
..
If you can read this line, the dot above did not end the message.
.
""".encode("ascii")


def msg_only_dot(t: int) -> bytes:
    return f"""\
Return-Path: <cron@{DOMAIN}>
Delivered-To: demo@{DOMAIN}
{received(t, "localhost", "127.0.0.1")}From: Cron Daemon <cron@{DOMAIN}>
To: demo@{DOMAIN}
Subject: Cron <demo@host> /usr/local/bin/nightly-check
Date: {date(t - 2)}
Message-ID: <cron.nightly.20240603@{DOMAIN}>
Auto-Submitted: auto-generated

.
""".encode("ascii")


def msg_no_final_newline(t: int) -> bytes:
    return f"""\
Return-Path: <monitor@{DOMAIN}>
Delivered-To: demo@{DOMAIN}
{received(t, "monitor.example.org", "10.0.0.5")}From: Uptime Monitor <monitor@{DOMAIN}>
To: demo@{DOMAIN}
Subject: [OK] www.example.org is up again
Date: {date(t - 5)}
Message-ID: <monitor.1717.up@{DOMAIN}>
Content-Type: text/plain; charset=us-ascii

www.example.org answers again after 4 minutes of downtime.
This file has no newline after its last line.""".encode("ascii")


def msg_crlf(t: int) -> bytes:
    text = f"""\
Return-Path: <erin@example.com>
Delivered-To: demo@{DOMAIN}
{received(t, "relay.example.com", "198.51.100.30")}From: Erin Walsh <erin@example.com>
To: demo@{DOMAIN}
Subject: Sent from a Windows client (CRLF line ends)
Date: {date(t - 33)}
Message-ID: <000001da.erin@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=windows-1252
Content-Transfer-Encoding: 7bit

Hi,

this message was stored with CR LF line ends, as some delivery
agents do. A POP3 server must not turn them into CR CR LF.

Erin
"""
    return text.replace("\n", "\r\n").encode("ascii")


WORDS = (
    "request served backend latency cache miss hit upstream timeout retry worker "
    "queue flushed session opened closed user mailbox index rebuilt checksum ok "
    "warning disk usage rotated archive bytes transferred client accepted denied "
    "deferred delivered bounced relay spool scan clean signature updated"
).split()


def msg_big(t: int, size: int = 3 * 1024 * 1024) -> bytes:
    head = f"""\
Return-Path: <reports@{DOMAIN}>
Delivered-To: demo@{DOMAIN}
{received(t, "logs.example.org", "10.0.0.9")}From: Log Reporter <reports@{DOMAIN}>
To: demo@{DOMAIN}
Subject: Weekly log excerpt (about 3 MB of text)
Date: {date(t - 8)}
Message-ID: <weekly-logs-2024-22@{DOMAIN}>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Weekly log excerpt, generated. It is large on purpose: fetching it
shows how tpops streams a message of a few megabytes.

"""
    rng = random.Random(20240603)  # fixed seed: the same bytes on every run
    lines = [head]
    total = len(head)
    n = 0
    start = t - 7 * 86400
    while total < size:
        n += 1
        stamp = start + n * 3
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        line = (f"{stamp} {HOST} app[{1000 + n % 97}]: #{n:07d} {words} "
                f"t={rng.randint(1, 999)}ms\n")
        lines.append(line)
        total += len(line)
    lines.append("-- end of excerpt --\n")
    return "".join(lines).encode("ascii")


def msg_new_reply(t: int) -> bytes:
    return f"""\
Return-Path: <alice@example.net>
Delivered-To: demo@{DOMAIN}
{received(t, "mail.example.net", "192.0.2.25")}From: Alice Martin <alice@example.net>
To: Demo User <demo@{DOMAIN}>
Subject: Re: Lunch on Thursday?
Date: {date(t - 15)}
Message-ID: <20240604091500.4788@mail.example.net>
In-Reply-To: <20240603060000.demo@{DOMAIN}>
References: <20240603050000.4711@mail.example.net> <20240603060000.demo@{DOMAIN}>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Great, see you there at 12:30!

Alice
""".encode("ascii")


def msg_new_notice(t: int) -> bytes:
    return f"""\
Return-Path: <noreply@git.example.org>
Delivered-To: demo@{DOMAIN}
{received(t, "git.example.org", "203.0.113.77")}From: Git Server <noreply@git.example.org>
To: demo@{DOMAIN}
Subject: [tpops] Pull request #42 merged: Maildir size cache
Date: {date(t - 3)}
Message-ID: <tpops/pull/42/merged@git.example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit
X-Mailer: git-notify 2.1

Pull request #42 "Maildir size cache" was merged into main by carol.

  src/tpops/mailbox/maildir.py | 88 ++++++++++++++----
  1 file changed, 72 insertions(+), 16 deletions(-)

— You are receiving this because you are watching the repository.
""".encode("utf-8")


# (maker, seconds after BASE_TIME, folder, flags or None, add ,S= and ,W=)
MESSAGES = (
    (msg_plain, 0, "cur", "S", True),
    (msg_alternative, 1800, "cur", "S", False),
    (msg_attachment, 3700, "cur", "", True),
    (msg_list, 5400, "cur", "S", True),
    (msg_iso2022jp, 7300, "cur", "", False),
    (msg_utf8, 9100, "cur", "RS", False),
    (msg_dots, 10900, "cur", "S", False),
    (msg_only_dot, 12700, "cur", "", False),
    (msg_no_final_newline, 14500, "cur", "", False),
    (msg_crlf, 16300, "cur", "F", False),
    (msg_big, 18100, "cur", "", True),
    (msg_new_reply, 86400, "new", None, True),
    (msg_new_notice, 90000, "new", None, False),
)


def crlf_size(data: bytes) -> int:
    """The RFC 1939 size: every line end counted as CR LF (Dovecot's ,W=)."""
    return len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def write_maildir(maildir: str) -> list[str]:
    for sub in ("", "cur", "new", "tmp"):
        os.mkdir(os.path.join(maildir, sub), 0o700)
    names = []
    for i, (maker, offset, folder, flags, sized) in enumerate(MESSAGES):
        t = BASE_TIME + offset
        data = maker(t)
        name = f"{t}.M{(offset * 7919 + 104729) % 1000000:06d}P{2300 + i * 17}.{HOST}"
        if sized:
            name += f",S={len(data)},W={crlf_size(data)}"
        if flags is not None:
            name += ":2," + flags
        path = os.path.join(maildir, folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.utime(path, (t, t))
        names.append(f"{folder}/{name}")
    return names


# ---------------------------------------------------------------- config files

def quote(value: str) -> str:
    """A single-quoted tpops.conf string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def world_searchable(path: str) -> bool:
    """True if every directory from / down to ``path`` has o+x."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def nobody_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        sys.exit("make_demo: running as root needs a 'nobody' user to own the demo Maildir")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = pw.pw_gid
    return pw.pw_uid, gid


def chown_tree(top: str, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def remove_old(demo: str) -> None:
    if os.path.islink(demo):
        sys.exit(f"make_demo: {demo} is a symbolic link; not touching it")
    if not os.path.isdir(demo):
        if os.path.lexists(demo):
            sys.exit(f"make_demo: {demo} exists and is not a directory")
        return
    # A Maildir placed in a temp dir by an earlier run: remove it too.
    try:
        with open(os.path.join(demo, ".maildir-home")) as fh:
            old = fh.read().strip()
    except OSError:
        old = ""
    if old and os.path.isfile(os.path.join(old, MARKER)) and not os.path.islink(old):
        shutil.rmtree(old)
    shutil.rmtree(demo)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    parser = argparse.ArgumentParser(description="(Re)create the tpops demo directory.")
    parser.add_argument("--dir", default=os.path.join(repo, "demo"),
                        help="demo directory (default: demo/ in the repository)")
    parser.add_argument("--port", type=int, default=1110, help="port written to tpops.conf")
    options = parser.parse_args()

    demo = os.path.abspath(options.dir)
    remove_old(demo)
    os.mkdir(demo, 0o755)
    os.chmod(demo, 0o755)  # whatever the umask: nobody must be able to pass through

    as_root = os.geteuid() == 0
    home = demo
    notes = []
    if as_root and (not world_searchable(demo) or ":" in demo):
        home = tempfile.mkdtemp(prefix="tpops-demo-")
        os.chmod(home, 0o755)
        open(os.path.join(home, MARKER), "w").close()
        with open(os.path.join(demo, ".maildir-home"), "w") as fh:
            fh.write(home + "\n")
        notes.append(f"{demo} is not reachable by user nobody (a directory above it lacks o+x),\n"
                     f"so the demo Maildir is in {home}/Maildir instead.")
    elif ":" in demo:
        sys.exit(f"make_demo: the path {demo} contains ':', which the passwd-file "
                 f"format cannot hold; use --dir")

    maildir = os.path.join(home, "Maildir")
    names = write_maildir(maildir)
    if as_root:
        uid, gid = nobody_ids()
        chown_tree(maildir, uid, gid)
        notes.append("running as root: sessions are served as the Maildir's owner, nobody:nogroup.")

    os.mkdir(os.path.join(demo, "lock"), 0o700)

    # Dovecot passwd-file: login:password:uid:gid:gecos:home:shell:extra.
    # Empty uid/gid: serve as the Maildir's owner. Maildir = home/Maildir/.
    with open(os.path.join(demo, "passwd"), "w") as fh:
        fh.write("# tpops demo users (Dovecot passwd-file format)\n"
                 "# login:password:uid:gid:gecos:home:shell:extra\n"
                 f"demo:{{PLAIN}}demo:::Demo User:{home}::\n")
    os.chmod(os.path.join(demo, "passwd"), 0o600)

    with open(os.path.join(demo, "tpops.conf"), "w") as fh:
        fh.write(f"""\
# tpops demo configuration, written by scripts/make_demo.py (recreated on every run).
# See tpops.conf.sample for every parameter.

$port = {options.port}
$bind_address = '127.0.0.1'
$hostname = 'localhost'
$access_log = {quote(os.path.join(demo, "access.log"))}
$error_log = nil
$syslog_facility = nil

$error_interval = 1
$min_servers = 2
$max_servers = 10

$auth_type = 'File'
$auth_file = {quote(os.path.join(demo, "passwd"))}
$passwd_lock_dir = {quote(os.path.join(demo, "lock"))}
""")

    total = sum(os.path.getsize(os.path.join(maildir, n)) for n in names)
    print(f"demo: {len(names)} messages ({total} bytes) in {maildir}/"
          f" ({sum(n.startswith('new/') for n in names)} in new/)")
    for note in notes:
        print(f"demo: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
