"""systemd without systemd as PID 1: the notify protocol recorded by a test NOTIFY_SOCKET,
socket activation through systemd-socket-activate with a real client, journald's
``<N>`` stderr lines, and the unit files in contrib/systemd checked by systemd-analyze."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.marks import IN_CI
from tests.support.procs import (
    gone,
    idle_workers,
    proc_title,
    stop_process,
    wait_for,
    worker_titles,
)
from tests.support.server import (
    POOL_ARGS,
    REPO,
    TPOPS,
    MailEnv,
    Server,
    free_port,
    make_message,
    wait_for_port,
)
from tests.support.syslog import SyslogCatcher
from tpops.systemd import Notifier

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_socket_activate = pytest.mark.skipif(  # scripts/test installs it; in CI a missing tool fails
    SOCKET_ACTIVATE is None and not IN_CI, reason="systemd-socket-activate (Debian package systemd) is not installed")
UNITS = REPO / "contrib" / "systemd"


class NotifySocket(SyslogCatcher):
    """A test NOTIFY_SOCKET: an AF_UNIX datagram socket recording each sd_notify() message."""

    def states(self) -> list[str]:
        """The state changes in order (READY=1, RELOADING=1, STOPPING=1), STATUS-only messages left out."""
        out = []
        for message in self.lines():
            first = message.split("\n", 1)[0]
            if not first.startswith("STATUS="):
                out.append(first)
        return out

    def wait_states(self, count: int, timeout: float = 10.0) -> list[str]:
        return wait_for(lambda: self.states() if len(self.states()) >= count else None, timeout,
                        what=f"{count} notify state messages (have {self.states()})")


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


def test_notify_ready_reloading_stopping_in_order(mail_env: MailEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    mail_env.add_user("alice", messages=[make_message("one")])
    notify = NotifySocket(mail_env.base / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    srv = Server(mail_env, *POOL_ARGS)
    try:
        srv.start()
        master = srv.proc.pid
        assert notify.wait_states(1) == ["READY=1"]
        ready = fields(notify.lines()[0])
        assert re.fullmatch(r"\d+ workers \(\d+ busy, \d+ idle\), max 8", ready["STATUS"]), ready
        # A session in flight across the graceful reload (SIGUSR1) is served to the end.
        c = RawClient(srv.port)
        assert c.login("alice").startswith(b"+OK")
        old = set(worker_titles(master))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        srv.proc.send_signal(signal.SIGHUP)
        assert notify.wait_states(3)[1:] == ["RELOADING=1", "READY=1"]
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        c.close()
        wait_for(lambda: all(gone(p) for p in old) and idle_workers(master), what="fresh workers after SIGHUP")
        c = RawClient(srv.port)
        assert c.login("alice").startswith(b"+OK")
        srv.proc.send_signal(signal.SIGUSR1)
        assert notify.wait_states(5)[3:] == ["RELOADING=1", "READY=1"]
        assert c.cmd("STAT").startswith(b"+OK 1 ")  # graceful: the session goes on
        assert c.cmd("QUIT").startswith(b"+OK")
        c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
    finally:
        srv.stop()
        notify.close()
    assert notify.states() == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    reloading = [fields(m) for m in notify.lines() if m.startswith("RELOADING=1")]
    # MONOTONIC_USEC (systemd 253+) is CLOCK_MONOTONIC when the reload began.
    assert before <= int(reloading[0]["MONOTONIC_USEC"]) <= after
    assert reloading[0]["STATUS"] == "reloading (SIGHUP)" and reloading[1]["STATUS"] == "reloading (SIGUSR1)"
    stopping = fields(notify.lines()[-1])
    assert stopping["STATUS"].startswith("stopping ")


def test_notify_socket_keeps_tpops_in_the_foreground(mail_env: MailEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Type=notify: even without --fg, the process systemd started is the master (no detaching)."""
    notify = NotifySocket(mail_env.base / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    port = free_port()
    proc = subprocess.Popen([TPOPS, "-f", str(mail_env.conf), "--port", str(port), "--bind", "127.0.0.1",
                             *POOL_ARGS], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        assert notify.wait_states(1) == ["READY=1"]
        assert proc.poll() is None and proc_title(proc.pid) == "tpops: master"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
        notify.close()
    assert notify.states() == ["READY=1", "STOPPING=1"]


def test_notifier_speaks_to_an_abstract_socket() -> None:
    name = f"tpops-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier("@" + name)
        assert notifier.enabled
        assert notifier.reloading("reloading (SIGHUP)")
        message = sock.recv(4096).decode()
    lines = message.split("\n")
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading (SIGHUP)"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", lines[1])
    # Without NOTIFY_SOCKET, nothing is sent and nothing fails.
    assert not Notifier(None).enabled and not Notifier(None).ready("x")
    # A socket that is gone costs nothing either.
    assert not Notifier("/nonexistent/notify.sock").ready("x")


# -- socket activation -----------------------------------------------------------


def socket_activated(env: MailEnv, port: int, *args: str, fdname: str = "pop3") -> subprocess.Popen[bytes]:
    """tpops started by systemd-socket-activate, which listens on ``port`` and execs tpops
    (same pid) at the first connection with the socket as descriptor 3."""
    assert SOCKET_ACTIVATE is not None
    stderr = (env.base / f"activate-{port}.log").open("wb")
    try:
        return subprocess.Popen(
            [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", f"--fdname={fdname}",
             TPOPS, "--fg", "-f", str(env.conf), *args],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    finally:
        stderr.close()


def activation_log(env: MailEnv, port: int) -> str:
    return (env.base / f"activate-{port}.log").read_text(errors="replace")


@needs_socket_activate
def test_socket_activation_serves_mail_to_a_real_client(mail_env: MailEnv) -> None:
    body = "Hello through systemd's socket.\n"
    mail_env.add_user("alice", messages=[make_message("activated", body)])
    # $port names another port: with a socket from systemd, tpops must bind nothing itself.
    unused = free_port()
    mail_env.write_conf(port=str(unused))
    port = free_port()
    proc = socket_activated(mail_env, port, *POOL_ARGS)
    try:
        # The first connection makes systemd-socket-activate exec tpops; it waits in the backlog.
        wait_for_port(port, proc, timeout=20)
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 1
        _, lines, _ = client.retr(1)
        assert b"Subject: activated" in lines and body.strip().encode() in lines
        client.quit()
        assert proc_title(proc.pid) == "tpops: master"  # the activated process itself is the master
        with socket.socket() as probe:  # $port was never bound
            probe.bind(("127.0.0.1", unused))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    out = activation_log(mail_env, port)
    assert f"listening on 127.0.0.1:{port}" in out, out


@needs_socket_activate
def test_socket_activation_variables_are_not_passed_on(tmp_path: Path) -> None:
    """After tpops took its sockets, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES are gone from its
    environment, so no process it starts can mistake descriptor 3 for a socket of its own."""
    script = (
        "import os, subprocess, sys\n"
        "from tpops.systemd import inherited_listeners\n"
        "got = inherited_listeners()\n"
        "print([(l.name, l.kind, l.sock.getsockname()[1]) for l in got])\n"
        "print(subprocess.run(['env'], capture_output=True, text=True).stdout.count('LISTEN_'))\n"
    )
    port = free_port()
    assert SOCKET_ACTIVATE is not None
    proc = subprocess.Popen([SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=pop3",
                             "-E", f"PYTHONPATH={REPO / 'src'}", sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def trigger() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(trigger, what="systemd-socket-activate listening")
        out, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert out.splitlines() == [f"[('pop3', 'pop3', {port})]", "0"], err


def test_descriptor_kind_comes_from_its_name_else_from_the_port() -> None:
    """``FileDescriptorName=pop3``/``pop3s`` decide; otherwise the TLS port (995) means TLS."""
    script = (
        "import os, socket, sys\n"
        "from tpops.systemd import inherited_listeners\n"
        "a = socket.socket(); a.bind(('127.0.0.1', 0)); a.listen()\n"
        "b = socket.socket(); b.bind(('127.0.0.1', 0)); b.listen()\n"
        "tls_port = b.getsockname()[1]\n"
        "os.dup2(a.fileno(), 3); os.dup2(b.fileno(), 4)\n"
        "def run(names):\n"
        "    os.environ.update(LISTEN_FDS='2', LISTEN_PID=str(os.getpid()))\n"
        "    if names is not None: os.environ['LISTEN_FDNAMES'] = names\n"
        "    got = inherited_listeners(tls_port=tls_port)\n"
        "    print([(l.name, l.kind) for l in got])\n"
        "    for l in got: l.sock.detach()\n"
        "run(None)\n"
        "run('pop3:pop3')\n"
        "run('pop3s:other')\n"
        "os.environ.update(LISTEN_FDS='2', LISTEN_PID='1')\n"
        "print(inherited_listeners(), 'LISTEN_FDS' in os.environ)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[('unknown', 'pop3'), ('unknown', 'pop3s')]",
        "[('pop3', 'pop3'), ('pop3', 'pop3')]",
        "[('pop3s', 'pop3s'), ('other', 'pop3s')]",
        "[] False",  # LISTEN_PID is another process: not ours, and still unset
    ]


@needs_socket_activate
def test_an_implicit_tls_socket_is_refused_without_tls(mail_env: MailEnv) -> None:
    """A pop3s socket is never served in the clear: tpops says why and exits 1."""
    port = free_port()
    proc = socket_activated(mail_env, port, fdname="pop3s")
    try:
        def trigger() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(trigger, what="systemd-socket-activate listening")
        assert proc.wait(20) == 1
    finally:
        stop_process(proc)
    out = activation_log(mail_env, port)
    assert (f"tpops: cannot start: systemd passed an implicit-TLS listener (pop3s (127.0.0.1:{port})), "
            "but TLS is not configured") in out, out


@needs_socket_activate
def test_an_implicit_tls_socket_is_served_with_tls(mail_env: MailEnv) -> None:
    """With a certificate, systemd's pop3s socket speaks implicit TLS (tpops binds nothing itself)."""
    import poplib

    from tests.support.tlscerts import issue

    mail_env.add_user("alice", messages=[make_message("over TLS")])
    certs = issue(mail_env.base)
    mail_env.write_conf(port=str(free_port()), tls_port="nil", tls_cert_file=repr(str(certs.cert_file)),
                        tls_key_file=repr(str(certs.key_file)))
    port = free_port()
    proc = socket_activated(mail_env, port, fdname="pop3s")
    try:
        def connect() -> poplib.POP3_SSL | None:
            try:
                return poplib.POP3_SSL("127.0.0.1", port, context=certs.client_context(), timeout=10)
            except OSError:
                return None
        client = wait_for(connect, what="a TLS greeting from the activated tpops")
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 1
        client.quit()
    finally:
        stop_process(proc)
    assert "(TLS: TLSv1.3" in activation_log(mail_env, port)


@needs_socket_activate
def test_inetd_style_activation_one_process_per_connection(mail_env: MailEnv) -> None:
    """tpops-inetd.socket's semantics: Accept=yes, the connection on stdin/stdout, tpops --inetd."""
    mail_env.add_user("alice", messages=[make_message("first"), make_message("second")])
    port = free_port()
    assert SOCKET_ACTIVATE is not None
    log = (mail_env.base / "inetd-activate.log").open("wb")
    proc = subprocess.Popen([SOCKET_ACTIVATE, "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                             TPOPS, "--inetd", "-f", str(mail_env.conf), *POOL_ARGS],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    try:
        wait_for_port(port, proc)
        for _ in range(2):  # each connection its own process
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user("alice")
            client.pass_("secret")
            assert client.stat()[0] == 2
            assert b"Subject: second" in client.retr(2)[1]
            client.quit()

        # The access log names the real peer (getpeername on the inherited socket), one line
        # a session; each --inetd process writes it after its last reply, so wait for both.
        def alice_lines() -> list[str] | None:
            found = [line for line in mail_env.access_log.read_text().splitlines() if " alice " in line]
            return found if len(found) == 2 else None

        lines = wait_for(alice_lines, what="two access-log lines for alice")
        assert all(line.startswith("127.0.0.1 ") for line in lines)
    finally:
        stop_process(proc)


# -- the unit files --------------------------------------------------------------


@pytest.mark.skipif(SYSTEMD_ANALYZE is None and not IN_CI,
                    reason="systemd-analyze (Debian package systemd) is not installed")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify, offline: the units with ExecStart pointing at the installed tpops."""
    names = sorted(p.name for p in UNITS.iterdir())
    assert names == ["tpops-inetd.socket", "tpops-inetd@.service", "tpops-pop3s.socket", "tpops.service",
                     "tpops.socket"]
    for name in names:
        text = (UNITS / name).read_text()
        assert "/usr/bin/tpops" in text or name.endswith(".socket")
        (tmp_path / name).write_text(text.replace("/usr/bin/tpops", TPOPS))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_service_unit_contents() -> None:
    """What the units promise: notify, reload by SIGUSR1, the sandbox, the capability set."""
    service = (UNITS / "tpops.service").read_text()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1]
                for line in service.splitlines() if "=" in line and not line.startswith("#")}
    assert settings["Type"] == "notify"
    assert settings["ExecStart"] == "/usr/bin/tpops --fg"
    assert settings["ExecReload"] == "/bin/kill -USR1 $MAINPID"
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == "yes" and settings["RuntimeDirectory"] == "tpops"
    assert set(settings["ReadWritePaths"].split()) == {"-/home", "-/var/mail", "-/var/vmail"}
    assert set(settings["CapabilityBoundingSet"].split()) == {
        "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_READ_SEARCH"}
    sockets = (UNITS / "tpops.socket").read_text()
    assert "\nListenStream=110\n" in sockets and "\nFileDescriptorName=pop3\n" in sockets
    tls = (UNITS / "tpops-pop3s.socket").read_text()
    assert "\nListenStream=995\n" in tls and "\nFileDescriptorName=pop3s\n" in tls
    inetd = (UNITS / "tpops-inetd.socket").read_text()
    assert "\nAccept=yes\n" in inetd
    assert "\nExecStart=/usr/bin/tpops --inetd\n" in (UNITS / "tpops-inetd@.service").read_text()


# -- journald's stderr -----------------------------------------------------------


def test_stderr_lines_carry_journald_priorities_under_systemd(mail_env: MailEnv,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With JOURNAL_STREAM naming stderr, every line starts with <N>: 3 error, 4 warning,
    6 info, 7 debug (--debug); no time stamp (journald adds its own)."""
    srv = Server(mail_env, "--debug", *POOL_ARGS)
    srv.stderr_path.touch()
    st = srv.stderr_path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    # Server.start() opens the file for writing without truncating its inode: same dev:inode.
    srv.start()
    assert srv.stderr_path.stat().st_ino == st.st_ino
    try:
        c = RawClient(srv.port)
        c.cmd("USER mallory")
        assert c.cmd("PASS guess").startswith(b"-ERR [AUTH]")
        c.cmd("QUIT")
        c.close()
        mail_env.conf.write_text("$port = 'not a number'\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in srv.output(), what="the failed reload")
    finally:
        srv.stop()
    lines = srv.output().splitlines()
    assert lines and all(re.match(r"<[3467]>", line) for line in lines), lines
    assert "<4>authentication failed: mallory from 127.0.0.1" in lines
    assert any(line.startswith("<6>connect from 127.0.0.1") for line in lines)
    assert any(line.startswith("<7>C: USER mallory") for line in lines)
    assert any(line.startswith("<3>SIGHUP: configuration not reloaded") for line in lines)


def test_stderr_lines_keep_their_time_stamp_elsewhere(mail_env: MailEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fg on a terminal or into a file (JOURNAL_STREAM absent or naming another stream):
    the readable format, with time, pid and level."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    srv = Server(mail_env).start()
    try:
        c = RawClient(srv.port)
        c.cmd("USER mallory")
        c.cmd("PASS guess")
        c.close()
        wait_for(lambda: "authentication failed" in srv.output(), what="the failed login on stderr")
    finally:
        srv.stop()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} tpops\[\d+\]: WARNING authentication failed: "
                     r"mallory from 127\.0\.0\.1$", srv.output(), re.MULTILINE), srv.output()
