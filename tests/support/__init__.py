"""Helpers the tests share (tests/conftest.py holds only fixtures and hooks), also used by scripts/bench.

server   MailEnv, Server, run_inetd, free_port, wait_for_port, make_message, chown_tree
client   RawClient, unstuff
procs    /proc helpers: proc_title, proc_cmdline, proc_children, worker_titles, idle_workers,
         worker_serving, proc_ids, gone, proc_status_kib, proc_pss_kib; wait_for, stop_process
syslog   SyslogCatcher, with_dev_log, SyslogServer (a /dev/log stand-in)
users    Accounts and other system-user helpers, as_user
mariadb  the MariaDB to test against, temp_database, PrivateMariaDB
marks    root_only
"""
