"""Mailboxes: the Maildir snapshot a session serves, its wire encoding, and its lock.

``maildir`` takes the per-session snapshot and performs UPDATE, ``encode`` defines the
RFC 1939 multi-line encoding of a message and the exact size it implies, ``lock``
keeps a mailbox to one session at a time.
"""
