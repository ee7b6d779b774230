"""The TLS certificate every TLS row serves (tpops and Dovecot alike): trustme, made per run, never on disk for long."""

from __future__ import annotations

from pathlib import Path

try:  # the test helpers' certificate maker (tests/support/ or tests/, wherever this checkout has it)
    from tests.support.tlscerts import CertFiles, issue
except ImportError:  # pragma: no cover - older layout
    from tests.tlscerts import CertFiles, issue  # type: ignore[no-redef]

TlsFiles = CertFiles

#: The key type of the bench certificate: RSA 2048, what most certbot/ACME set-ups still issue.
KEY_TYPE = "rsa"


def bench_certificate(base: Path) -> CertFiles:
    """A CA and a server certificate for 127.0.0.1/localhost in ``base``/tls (the leaf, signed by the CA the clients trust; 0600 key)."""
    d = base / "tls"
    d.mkdir(mode=0o755)
    return issue(d, KEY_TYPE, name="bench")
