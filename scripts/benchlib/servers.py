"""The servers under test: tpops in its process models and a private Dovecot, on free loopback ports."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from benchlib.certs import TlsFiles
from benchlib.common import IS_ROOT, TPOPS, VENV, log
from benchlib.world import World
from tests.support.procs import proc_children, proc_cmdline, stop_process
from tests.support.server import free_port


def wait_greeting(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0, *,
                  source: str | None = None, tls: ssl.SSLContext | None = None) -> None:
    """Wait until a POP3 server greets on ``host:port`` (then QUIT and wait for the close).

    ``source``: the client's own address (e.g. one outside $haproxy_trusted_networks, so that a
    node behind a balancer greets without a PROXY header); ``tls``: do an implicit-TLS handshake
    first. RuntimeError when ``proc`` exits first or no greeting comes within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    last = "nothing tried"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        sock = socket.socket()
        try:
            sock.settimeout(5)
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            conn: socket.socket = tls.wrap_socket(sock, server_hostname=host) if tls else sock
            if conn.recv(512).startswith(b"+OK"):
                conn.sendall(b"QUIT\r\n")
                while conn.recv(512):  # wait for the close: the probe's access-log line is written
                    pass
                conn.close()
                return
        except OSError as exc:
            last = str(exc) or type(exc).__name__
            time.sleep(0.05)
        finally:
            sock.close()
    raise RuntimeError(f"no POP3 greeting{' over TLS' if tls else ''} on {host}:{port} within {timeout:g} s "
                       f"(last: {last})")


class Server:
    label = ""
    kind = ""
    port = 0
    proc: subprocess.Popen | None = None

    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def first_login_reset(self, maildir: Path) -> None:
        raise NotImplementedError

    def serving_pid(self, user: str) -> int | None:
        """The process serving ``user``'s session (found by its process title)."""
        todo = [self.master_pid()]
        seen = 0
        while todo and seen < 10000:
            pid = todo.pop()
            seen += 1
            for kid in proc_children(pid):
                cmd = proc_cmdline(kid)
                if self.serving_match(cmd, user):
                    return kid
                todo.append(kid)
        return None

    def serving_match(self, cmdline: str, user: str) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "out", None):
            self.out.close()


PREIMPORT_LAUNCHER = """
import importlib, pkgutil, sys
import tpops
for m in pkgutil.walk_packages(tpops.__path__, "tpops."):
    try:
        importlib.import_module(m.name)
    except Exception:
        pass
from tpops.cli import main
sys.argv[0] = "tpops"
sys.exit(main())
"""


class TpopsServer(Server):
    kind = "tpops"
    launcher_note: str | None = None

    def __init__(self, world: World, mode: str, *, name: str | None = None,
                 overrides: dict[str, str] | None = None, host: str = "127.0.0.1",
                 probe_source: str | None = None, tls: TlsFiles | None = None) -> None:
        self.world = world
        self.mode = mode  # root-drop | user | nonroot
        self.label = f"tpops ({name or mode})"
        self.host = host
        self.probe_source = probe_source  # where the start-up probe connects from
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        if tls:
            overrides = {"tls_cert_file": repr(str(tls.cert_file)), "tls_key_file": repr(str(tls.key_file)),
                         "tls_port": str(self.tls_port), **(overrides or {})}
        b = world.base
        tag = (name or mode).replace("-", "_").replace(" ", "_").replace(",", "")
        self.tag = tag
        self.conf = b / f"tpops-{tag}.conf"
        self.access_log = b / f"access-{tag}.log"
        self.error_log = b / f"error-{tag}.log"
        self.stderr_path = b / f"stderr-{tag}.log"
        settings = {
            "auth_type": "'File'",
            "auth_file": repr(str(world.passwd_file)),
            "passwd_lock_dir": repr(str(b / f"locks-{tag}")),
            "access_log": repr(str(self.access_log)),
            "error_log": repr(str(self.error_log)),
            # its own --status socket: as root the default (/run/tpops/control) is shared with any other tpops
            "control_socket": repr(str(b / f"control-{tag}")),
            "syslog_facility": "nil",
            "error_interval": "0",
            "min_servers": "8",
            "max_servers": str(max(world.profile.login_levels) + 12),
            "max_use": "0",
            "max_connections_per_ip": "0",  # every bench client comes from 127.0.0.1
            "max_idle": "600",
            # root mode: room to keep one post-login process per user of the distinct-uid rows
            "post_login_workers": "200",
            "hostname": "'bench.example.org'",
            **(overrides or {}),
        }
        self.settings = settings
        self.conf.write_text("".join(f"${k} = {v}\n" for k, v in settings.items()))
        self.args = [str(TPOPS), "--fg", "-f", str(self.conf), "--port", str(self.port), "--bind", host]
        if mode == "user":
            self.args += ["--user", "nobody", "--group", "nogroup"]

    def start(self) -> TpopsServer:
        try:
            self._start(self.args)
        except RuntimeError as exc:
            if "No module named" not in str(exc):
                raise
            # The workers import modules after dropping to nobody, and this Python's
            # library is not readable by nobody (e.g. pyenv under a 0700 /root): start
            # tpops through a launcher that imports every tpops module first, and say so.
            self.launcher_note = (
                f"plain `tpops` could not start its workers as nobody ({str(exc).splitlines()[-1]}); "
                "started through a launcher that pre-imports every tpops module before the fork"
            )
            log(f"{self.label}: {self.launcher_note}")
            self._start([str(VENV / "bin" / "python"), "-c", PREIMPORT_LAUNCHER, *self.args[1:]])
        return self

    def _start(self, args: list[str]) -> None:
        self.out = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out)
        try:
            wait_greeting(self.host, self.port, self.proc, timeout=20.0, source=self.probe_source)
            if self.tls and self.tls_port:
                wait_greeting(self.host, self.tls_port, self.proc, timeout=10.0, tls=self.tls.client_context())
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.label}: {exc}\n{self.stderr_path.read_text(errors='replace')[-2000:]}")

    def first_login_reset(self, maildir: Path) -> None:
        for p in maildir.iterdir():
            if p.name == "tpops-sizecache" or p.name.startswith(".tpops-sizecache."):
                p.unlink()

    def serving_match(self, cmdline: str, user: str) -> bool:
        # a worker, or in root mode the post-login process it handed the session to
        return cmdline.startswith(("tpops: worker", "tpops: post-login")) and f" {user}@" in cmdline + " "

    def idle_workers(self) -> list[int]:
        return [k for k in proc_children(self.master_pid()) if proc_cmdline(k).startswith("tpops: worker idle")]

    def problems(self) -> str:
        text = ""
        for p in (self.error_log, self.stderr_path):
            try:
                text += p.read_text(errors="replace")
            except OSError:
                pass
        return text


class DovecotServer(Server):
    """A private Dovecot. ``variant``: "per-session" (Dovecot's default: a fresh pop3
    process per session, the analogue of tpops root-drop) or "reuse" (pop3 processes
    serve many sessions, possible because every mailbox belongs to one uid: the
    analogue of tpops --user). Both keep 8 pop3 processes pre-started."""

    kind = "dovecot"

    def __init__(self, world: World, variant: str, tls: TlsFiles | None = None) -> None:
        self.world = world
        self.variant = variant
        self.label = "dovecot" if variant == "per-session" else f"dovecot ({variant})"
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        b = world.base / f"dovecot-{variant}"
        b.mkdir(mode=0o755)
        self.dir = b
        self.conf = b / "dovecot.conf"
        self.log_path = b / "dovecot.log"
        self.stderr_path = b / "stderr.log"
        me = pwd.getpwuid(os.getuid()).pw_name
        mygroup = grp.getgrgid(os.getgid()).gr_name
        lines = [
            f"base_dir = {b}/run",
            f"state_dir = {b}/state",
            f"instance_name = tpops-bench-dovecot-{variant}",
            "protocols = pop3",
            "listen = 127.0.0.1",
            *([
                "ssl = yes",  # TLS offered (STARTTLS and pop3s); plain logins still allowed on 127.0.0.1
                f"ssl_cert = <{tls.cert_file}",
                f"ssl_key = <{tls.key_file}",
                "ssl_min_protocol = TLSv1.2",  # as tpops's $tls_min_version default
            ] if tls else ["ssl = no"]),
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain",
            f"log_path = {self.log_path}",
            f"info_log_path = {self.log_path}",
            "login_trusted_networks = 127.0.0.0/8",
            "mail_location = maildir:~/Maildir",
            f"mail_uid = {world.uid}",
            f"mail_gid = {world.gid}",
            "first_valid_uid = 1" if not IS_ROOT else "first_valid_uid = 100",
            # No upper bound: nobody (65534) and the distinct-uid users (DISTINCT_UID_BASE and up),
            # whose uid and gid come from their passwd-file line (default_fields fill in the others).
            "last_valid_uid = 0",
            "pop3_uidl_format = %f",
            "pop3_no_flag_updates = yes",  # do not rename the shared Maildirs' files to add flags
            "verbose_proctitle = yes",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN {world.passwd_file}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {world.passwd_file}",
            f"  default_fields = uid={world.uid} gid={world.gid}",
            "}",
            "service pop3-login {",
            "  inet_listener pop3 {",
            "    address = 127.0.0.1",
            f"    port = {self.port}",
            "  }",
            "  inet_listener pop3s {",
            *(["    address = 127.0.0.1", f"    port = {self.tls_port}", "    ssl = yes"] if tls else ["    port = 0"]),
            "  }",
            "  service_count = 0",
            "  process_min_avail = 2",
            "  vsz_limit = 1G",
        ]
        if not IS_ROOT:
            lines += ["  chroot = ", "  user = " + me]
        lines += [
            "}",
            "service pop3 {",
            "  process_limit = 1024",
            "  process_min_avail = 8",
            f"  service_count = {1 if variant == 'per-session' else 1000}",
            "}",
            "service auth {",
            "  client_limit = 2000",
            "}",
        ]
        if not IS_ROOT:
            lines += [
                f"default_internal_user = {me}",
                f"default_internal_group = {mygroup}",
                f"default_login_user = {me}",
                "service anvil {", "  chroot = ", "}",
                "service imap-login {", "  chroot = ", "}",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.config_summary = [line.strip() for line in lines if "=" in line and not line.startswith("#")]
        self.config_note = ("service_count = 1: a fresh pop3 process per session" if variant == "per-session"
                            else "service_count = 1000: pop3 processes serve many sessions")

    def start(self) -> DovecotServer:
        check = subprocess.run(["doveconf", "-c", str(self.conf), "-n"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"doveconf rejects the config: {check.stderr.strip()[-1000:]}")
        self.out = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out
        )
        try:
            wait_greeting("127.0.0.1", self.port, self.proc, timeout=20.0)
            if self.tls_port:
                wait_greeting("127.0.0.1", self.tls_port, self.proc, timeout=10.0, tls=self.tls.client_context())
        except RuntimeError as exc:
            self.stop()
            tail = ""
            for p in (self.stderr_path, self.log_path):
                try:
                    tail += p.read_text(errors="replace")[-1500:]
                except OSError:
                    pass
            raise RuntimeError(f"dovecot: {exc}\n{tail}")
        return self

    def version(self) -> str:
        try:
            return subprocess.run(["dovecot", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    def first_login_reset(self, maildir: Path) -> None:
        # Index, cache, uidlist and list-index files all live in the Maildir root.
        for p in maildir.iterdir():
            if p.name.startswith("dovecot") and p.is_file():
                p.unlink()

    def serving_match(self, cmdline: str, user: str) -> bool:
        return "pop3" in cmdline and "login" not in cmdline and f"[{user} " in cmdline

    def idle_workers(self) -> list[int]:
        out = []
        for k in proc_children(self.master_pid()):
            cmd = proc_cmdline(k)
            if cmd.endswith("/pop3") or cmd.endswith("pop3 [idling]"):
                out.append(k)
        return out


def ensure_dovecot() -> str | None:
    """None when dovecot is usable, else the reason it is not."""
    if shutil.which("dovecot") and shutil.which("doveconf"):
        return None
    ok = subprocess.run(["dpkg", "-s", "dovecot-pop3d"], capture_output=True).returncode == 0
    if not ok:
        if not IS_ROOT or not shutil.which("apt-get"):
            return "dovecot-pop3d is not installed (and the bench is not root with apt-get)"
        log("installing dovecot-pop3d with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "install", "-y", "-q", "dovecot-pop3d"], capture_output=True,
                           text=True, env=env, timeout=600)
        if r.returncode != 0:
            return f"apt-get install dovecot-pop3d failed: {r.stderr.strip()[-500:]}"
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if shutil.which("dovecot") and shutil.which("doveconf"):
        return None
    return "dovecot binary not found after installing dovecot-pop3d"


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class HAProxyFront:
    """A private HAProxy in TCP mode (``send-proxy-v2``, tcp-check health checks expecting ``+OK``)
    on a free 127.0.0.1 port, balancing round-robin over ``nodes`` (tpops with
    $haproxy_trusted_networks naming 127.0.0.1, HAProxy's source address on loopback)."""

    label = "haproxy"

    def __init__(self, base: Path, nodes: list[TpopsServer], maxconn: int = 2000) -> None:
        self.port = free_port()
        self.conf = base / "haproxy.cfg"
        self.stderr_path = base / "haproxy.log"
        servers = "\n".join(
            f"  server {n.tag} {n.host}:{n.port} send-proxy-v2 check-send-proxy check "
            f"inter 2s fall 2 rise 1" for n in nodes)
        self.conf.write_text(f"""global
  maxconn {maxconn}
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  retries 2
  option redispatch
frontend pop3
  bind 127.0.0.1:{self.port}
  maxconn {maxconn}
  default_backend tpops
backend tpops
  balance roundrobin
  option tcp-check
  tcp-check expect string +OK
  tcp-check send QUIT\\r\\n
{servers}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxyFront:
        self.out = self.stderr_path.open("wb")
        self.proc = subprocess.Popen([HAPROXY, "-f", str(self.conf), "-db"], stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=self.out)
        try:
            wait_greeting("127.0.0.1", self.port, self.proc, timeout=20.0)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"haproxy: {exc}\n{self.stderr_path.read_text(errors='replace')[-1500:]}")
        return self

    def version(self) -> str:
        try:
            out = subprocess.run([HAPROXY, "-v"], check=False, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "out", None):
            self.out.close()


def ensure_haproxy() -> str | None:
    """None when haproxy is usable, else the reason it is not (installed with apt-get when root)."""
    global HAPROXY
    if os.path.exists(HAPROXY):
        return None
    if not IS_ROOT or not shutil.which("apt-get"):
        return "haproxy is not installed (and the bench is not root with apt-get)"
    log("installing haproxy with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], check=False, capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0:
        return f"apt-get install haproxy failed: {r.stderr.strip()[-500:]}"
    HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return None if os.path.exists(HAPROXY) else "haproxy binary not found after installing haproxy"
