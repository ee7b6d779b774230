"""Throwaway TLS certificates for the tests, made with ``trustme`` (no key files in the repository).

``issue(directory, key_type)`` writes a server certificate for ``localhost`` and
``127.0.0.1`` and its key into ``directory`` and returns a :class:`CertFiles` naming
them, with the CA that a client must trust. The root CA signs the leaf directly, so the
certificate file holds the leaf alone; ``intermediate=True`` signs it with an
intermediate CA instead and writes leaf + intermediate, as certbot's fullchain.pem.
The fixtures ``rsa_certs`` and ``ecdsa_certs`` are that, one per test; import them
into a test module to use them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

KEY_TYPES = {"rsa": trustme.KeyType.RSA, "ecdsa": trustme.KeyType.ECDSA}


@dataclass(frozen=True)
class CertFiles:
    """A server certificate on disk: ``cert_file`` (leaf + chain), ``key_file``, ``ca_file``."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    ca: trustme.CA
    leaf: trustme.LeafCert

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this CA and checks the host name."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context

    @property
    def leaf_der(self) -> bytes:
        """The DER bytes of the served (leaf) certificate."""
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode("ascii"))


def issue(directory: Path, key_type: str = "rsa", *, ca: trustme.CA | None = None,
          name: str = "server", intermediate: bool = False) -> CertFiles:
    """Write ``<name>.crt`` (the leaf, then any intermediate), ``<name>.key`` and
    ``<name>-ca.crt`` (the root a client trusts) into ``directory``."""
    kind = KEY_TYPES[key_type]
    ca = ca or trustme.CA(key_type=kind)
    signer = ca.create_child_ca(key_type=kind) if intermediate else ca
    # A common name too: fetchmail insists on one (it says "Server name not specified").
    leaf = signer.issue_cert("localhost", "127.0.0.1", common_name="localhost", key_type=kind)
    cert_file = directory / f"{name}.crt"
    key_file = directory / f"{name}.key"
    ca_file = directory / f"{name}-ca.crt"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    return CertFiles(cert_file, key_file, ca_file, ca, leaf)


@pytest.fixture
def rsa_certs(tmp_path: Path) -> CertFiles:
    """An RSA server certificate for localhost/127.0.0.1 and its own CA."""
    return issue(tmp_path, "rsa", name="rsa")


@pytest.fixture
def ecdsa_certs(tmp_path: Path) -> CertFiles:
    """An ECDSA server certificate for localhost/127.0.0.1 and its own CA."""
    return issue(tmp_path, "ecdsa", name="ecdsa")
