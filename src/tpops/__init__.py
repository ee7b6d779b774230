"""tpops: a POP3 server for Maildir, a modern rewrite of TPOPS (Tommy's POP Server)."""

__version__ = "1.0.0"
