"""scripts/demo itself: it starts tpops over the generated Maildir and curl/poplib can fetch."""

from __future__ import annotations

import os
import poplib
import signal
import subprocess

import pytest

from tests.support.server import REPO, free_port, wait_for_port


@pytest.mark.timeout(180)
def test_demo_serves_its_mailbox() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "demo"), "--port", str(port)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, timeout=150)
        p = poplib.POP3("127.0.0.1", port, timeout=10)
        p.user("demo")
        p.pass_("demo")
        count, octets = p.stat()
        assert count >= 12
        sizes = [int(line.split()[1]) for line in p.list()[1]]
        assert sum(sizes) == octets
        assert any(size > 1_000_000 for size in sizes)  # the few-MB message
        for msn, size in enumerate(sizes, 1):
            lines = p.retr(msn)[1]
            assert sum(len(line) + 2 for line in lines) == size
        p.quit()
        out = subprocess.run(
            ["curl", "-s", "--max-time", "20", f"pop3://demo:demo@127.0.0.1:{port}/1"],
            capture_output=True, check=True,
        ).stdout
        assert len(out) == sizes[0] and b"\r\n" in out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode(errors="replace")
    assert f"curl pop3://demo:demo@127.0.0.1:{port}/1" in output
