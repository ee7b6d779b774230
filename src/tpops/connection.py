"""What a session knows about its connection: the client's address and how it is protected.

One small value shared by the states (CAPA, ``$disable_plaintext_auth``, SASL channel
binding) and the logs. The worker builds it after accept (and after a PROXY header);
STLS replaces it with :meth:`Connection.upgraded`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

#: How a connection is protected, as the logs name it.
PLAIN, IMPLICIT_TLS, STARTTLS, BALANCER_TLS = "plain", "TLS", "STLS", "PROXY-TLS"


@dataclass(frozen=True, slots=True)
class Connection:
    """The client's address and the connection's protection.

    ``security`` is one of :data:`PLAIN`, :data:`IMPLICIT_TLS` (the ``$tls_port``
    listener), :data:`STARTTLS` (upgraded by STLS) or :data:`BALANCER_TLS` (a trusted
    load balancer terminated TLS and said so in its PROXY v2 header). ``end_point`` is
    the RFC 5929 tls-server-end-point channel binding data when tpops itself runs TLS
    and the certificate allows it, else None. ``tls_description`` is e.g.
    ``TLSv1.3 TLS_AES_256_GCM_SHA384`` for the login log line.
    """

    peer: str
    security: str = PLAIN
    end_point: bytes | None = None
    tls_description: str | None = None
    #: Not a network connection: ``--inetd`` on pipes or a UNIX socket (a local program,
    #: such as ssh or stunnel, feeds the session). Counts as this host, as in Dovecot.
    local: bool = False

    @property
    def tls(self) -> bool:
        """The bytes on the wire are encrypted (by tpops or by a trusted balancer)."""
        return self.security != PLAIN

    @property
    def loopback(self) -> bool:
        """The client is on this host (127.0.0.0/8, ::1, or IPv4-mapped loopback, or
        :attr:`local`)."""
        if self.local:
            return True
        try:
            address = ipaddress.ip_address(self.peer)
        except ValueError:
            return False  # "stdin" of an inetd session over pipes, or a name
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback

    @property
    def secure(self) -> bool:
        """Passwords may cross it: encrypted, or never leaving the host (Dovecot's rule)."""
        return self.tls or self.loopback

    def upgraded(self, security: str, *, end_point: bytes | None, tls_description: str | None) -> Connection:
        """The same client after a TLS handshake on this connection."""
        return dataclasses.replace(self, security=security, end_point=end_point, tls_description=tls_description)
