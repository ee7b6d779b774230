"""PROXY protocol helpers for the wire tests: a v2 header as HAProxy sends it, and the wait
for a tpops that trusts its balancer (it greets only behind a header)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import time

from tpops.proxy import V2_SIGNATURE


def v2(src: str = "192.0.2.7", dst: str = "127.0.0.1", *, command: int = 1, tlvs: bytes = b"",
       sport: int = 40000, dport: int = 110) -> bytes:
    """A PROXY v2 header as HAProxy's send-proxy-v2 sends it (TCP over IPv4 or IPv6)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def wait_for_proxied_port(port: int, proc: subprocess.Popen[bytes], host: str = "127.0.0.1",
                          timeout: float = 10.0) -> None:
    """Wait until tpops greets a balancer's health check (a v2 LOCAL header) on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tpops exited with status {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(5)
                s.sendall(v2(command=0))
                if s.recv(512).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    while s.recv(512):
                        pass
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no greeting behind a PROXY header on {host}:{port}")
