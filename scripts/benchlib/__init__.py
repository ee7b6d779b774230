"""scripts/bench split by role: tpops against Dovecot on the same Maildirs (entry point: scripts/bench).

common   paths, the run profiles (full, --quick), log
world    the throw-away Maildirs and passwd-file both servers serve
servers  tpops and a private Dovecot on free loopback ports
clients  the load generators: logins (epoll), RETR, STAT+LIST+UIDL, a huge RETR with RSS sampling
run      Bench: set up, measure, compare, tear down; the JSON result
report   the Markdown table for the README
cli      the command line

Process helpers (/proc, free ports, waiting for a greeting, stopping) come from
tests/support, shared with the test suite.
"""
