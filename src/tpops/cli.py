"""The ``tpops`` command: options, configuration, and the choice of inetd, foreground or daemon mode.

Everything that can fail at start-up (configuration, listening address, log files,
a pid file held by a live tpops) fails here, on stderr with a non-zero status,
before the daemon detaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from tpops import __version__, logs, systemd
from tpops.config import (
    DEFAULT_PATH,
    Config,
    ConfigError,
    ConfigFile,
    config_problems,
    format_effective,
    read_config_file,
)
from tpops.tls import TLSConfigError, tls_from_config

EXIT_CONFIG = 2
EXIT_STARTUP = 1

DESCRIPTION = """\
tpops: a POP3 server (RFC 1939, RFC 2449) for Maildir mailboxes, a modern rewrite
of TPOPS. Without --fg or --inetd it detaches and runs as a daemon (except under
systemd's Type=notify, which needs it in the foreground). Listening sockets passed
by systemd (socket activation, LISTEN_FDS) are used instead of binding $port.
Signals: SIGTERM stops; SIGHUP reloads the configuration, reopens the logs and
restarts the workers, forcing clients off; SIGUSR1 does the same but lets busy
workers finish their session."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpops",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-f", dest="config_file", metavar="FILE",
                        help=f"configuration file (default {DEFAULT_PATH}; a missing default file means all defaults)")
    parser.add_argument("--domain", metavar="DOMAIN",
                        help="try a login without @, %% or + as LOGIN@DOMAIN ($default_domain)")
    parser.add_argument("--fg", action="store_true", help="serve in the foreground, logging to stderr too")
    parser.add_argument("--port", type=int, metavar="PORT", help="TCP port ($port, default 110)")
    parser.add_argument("--bind", metavar="ADDR", action="append",
                        help="listen on ADDR only; repeatable ($bind_address, default: all IPv6 and IPv4 addresses)")
    parser.add_argument("--debug", action="store_true", help="log the protocol trace, secrets masked ($debug)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--inetd", action="store_true",
                        help="serve one session on stdin/stdout, as started by inetd ($with_inetd); with a "
                             "certificate, implicit TLS when the local port is $tls_port, else STLS")
    parser.add_argument("--user", metavar="USER", help="run the workers as USER, name or number ($user)")
    parser.add_argument("--group", metavar="GROUP", help="run the workers as GROUP, name or number ($group)")
    parser.add_argument("--pidfile", metavar="FILE", help="write the master's pid to FILE ($pid_file)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration (values, users, groups, log directories); print "
                             "the effective settings and exit 0, or the errors and exit 2")
    parser.add_argument("--status", action="store_true",
                        help="print the running daemon's workers and sessions (asks $control_socket; root)")
    return parser


def effective_config(options: argparse.Namespace, *, check_system: bool = False) -> Config:
    """The file's settings with the command-line options applied on top.

    A problem is reported as ``command line: ...`` when an option set one of the
    parameters involved, else as ``FILE:LINE: ...``. ``check_system`` (for
    ``--check-config``) also checks the configuration against this host: users,
    groups, the directories of log and pid files, the TLS certificate, and a pre-flight
    worker booted as start-up would boot it.
    """
    source = read_config_file(options.config_file)
    overrides: dict[str, Any] = {}
    if options.domain is not None:
        overrides["default_domain"] = options.domain
    if options.port is not None:
        overrides["port"] = options.port
    if options.bind:
        overrides["bind_address"] = ",".join(options.bind)
    if options.debug:
        overrides["debug"] = True
    if options.inetd:
        overrides["with_inetd"] = True
    if options.user is not None:
        overrides["user"] = options.user
    if options.group is not None:
        overrides["group"] = options.group
    if options.pidfile is not None:
        overrides["pid_file"] = options.pidfile
    config = dataclasses.replace(source.config, **overrides)
    problems = config_problems(config)
    if not problems and check_system:
        from tpops.system_checks import system_problems

        problems = system_problems(config)
    if problems:
        raise ConfigError(_blamed(source, problems, overrides))
    if check_system:
        messages = _runtime_problems(config, source, overrides)
        if messages:
            raise ConfigError(messages)
    return config


def _runtime_problems(config: Config, source: ConfigFile, overrides: dict[str, Any]) -> list[str]:
    """What start-up itself would refuse, for ``--check-config``: the certificate and key
    loaded, then a throw-away worker booted as the workers will be (``--user``, the lock
    directory, the backend's own check: reading the passwd-file or ``/etc/shadow`` as the
    workers' identity, one MySQL round trip)."""
    from tpops.tls import TLSConfigError, tls_from_config
    from tpops.worker import preflight

    try:
        tls_from_config(config)
    except TLSConfigError as exc:
        return [source.blame(("tls_cert_file", "tls_key_file"), str(exc), overridden=overrides)]
    if config.with_inetd:
        return []  # inetd starts one session per connection: nothing boots ahead of it
    reason = preflight(config)
    if reason is not None:
        return [source.blame((), f"workers cannot start: {reason}", overridden=overrides)]
    return []


def _blamed(source: ConfigFile, problems: list[tuple[tuple[str, ...], str]],
            overrides: dict[str, Any]) -> list[str]:
    return [source.blame(names, message, overridden=overrides) for names, message in problems]


def setup_logs(config: Config, *, foreground: bool) -> logs.LogSetup:
    """The logs for ``config``; in the foreground also stderr, with journald's ``<N>``
    priority prefixes when stderr is the journal (under systemd)."""
    return logs.setup(
        facility=config.syslog_facility,
        error_log=config.error_log,
        access_log=config.access_log,
        debug=config.debug,
        to_stderr=foreground,
        journal=foreground and systemd.stderr_is_journal(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.version:
        print(f"tpops {__version__}")
        return 0
    if options.config_file is not None:
        # The daemon changes to / and reloads re-read this path: resolve it once, now.
        options.config_file = os.path.abspath(options.config_file)
    try:
        config = effective_config(options, check_system=options.check_config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    if options.check_config:
        sys.stdout.write(format_effective(config))
        return 0
    if options.status:
        from tpops.status import print_status

        return print_status(config)
    if config.with_inetd:
        return run_inetd(config)
    return run_standalone(config, options)


def run_inetd(config: Config) -> int:
    """One session on stdin/stdout; stderr may be the socket, so nothing is logged there."""
    from tpops.worker import serve_inetd

    try:
        log_files = setup_logs(config, foreground=False)
    except OSError as exc:
        logs.get("cli").error("cannot open a log file: %s", exc)
        return EXIT_STARTUP
    return serve_inetd(config, log_files)


def run_standalone(config: Config, options: argparse.Namespace) -> int:
    """The prefork master, in the foreground (--fg, or systemd's Type=notify) or detached as a daemon."""
    from tpops.arbiter import Arbiter, ListenError, make_listeners
    from tpops.daemonize import PidFile, PidFileError, detach

    notifier = systemd.Notifier.from_environment()
    # Type=notify: systemd waits for READY=1 from the process it started; detaching
    # would make that process exit and the service fail.
    foreground = options.fg or notifier.enabled
    try:
        log_files = setup_logs(config, foreground=foreground)
    except OSError as exc:
        print(f"tpops: cannot open a log file: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    notice = log_files.syslog_notice()
    if notice is not None:
        if not foreground:  # the log line below reaches $error_log; say it where the admin looks now
            print(f"tpops: warning: {notice}", file=sys.stderr)
        logs.get("cli").warning("%s", notice)
    pid_file = PidFile(config.pid_file) if config.pid_file else None
    try:
        if pid_file is not None:
            pid_file.check()
        # The address first: its error is the one an admin most often has to fix, and
        # it must not hide behind the pre-flight worker's output.
        # The certificate before the listeners: the TLS port is opened only when it loads.
        server_tls = tls_from_config(config)
        inherited, tls_listeners = take_inherited_listeners(config, server_tls is not None)
        listeners = inherited or make_listeners(config)
        if not inherited and server_tls is not None and config.tls_port is not None:
            try:
                tls_socks = make_listeners(config, config.tls_port)
            except BaseException:
                for sock in listeners:
                    sock.close()
                raise
            listeners += tls_socks
            tls_listeners = [sock.fileno() for sock in tls_socks]
        try:
            prepare_workers(config)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
    except (ListenError, TLSConfigError) as exc:
        print(f"tpops: {exc}", file=sys.stderr)  # TLSConfigError reads "FILE: what is wrong"
        return EXIT_STARTUP
    except (OSError, PidFileError, ValueError, systemd.ActivationError) as exc:
        print(f"tpops: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP

    def reload_config() -> Config:
        new = effective_config(options)
        prepare_workers(new)
        return new

    def reopen_logs(new: Config) -> logs.LogSetup:
        reopened = setup_logs(new, foreground=foreground)
        if not foreground:
            _stderr_to(reopened)
        notice = reopened.syslog_notice()
        if notice is not None and notice != log_files.syslog_notice():
            logs.get("cli").warning("%s", notice)
        return reopened

    if not foreground:
        log_files = detach(config, listeners, log_files, lambda: setup_logs(config, foreground=False))
        _stderr_to(log_files)
    if pid_file is not None:
        pid_file.write()
    try:
        arbiter = Arbiter(config, listeners, log_files, reload_config, reopen_logs,
                          notifier=notifier, inherited=bool(inherited), server_tls=server_tls,
                          tls_listeners=frozenset(tls_listeners))
        return arbiter.run()
    finally:
        if pid_file is not None:
            pid_file.remove()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def take_inherited_listeners(config: Config, tls: bool) -> tuple[list[socket.socket], list[int]]:
    """The listening sockets systemd passed (socket activation) and the fds of those that
    speak implicit TLS; ([], []) when none.

    Each carries its kind (``FileDescriptorName=pop3``/``pop3s``, else the port:
    ``$tls_port``, 995 by default, is implicit TLS). Without a certificate (``tls``
    false) a TLS listener is refused with a clear error rather than served in the clear.
    """
    from tpops.arbiter import address_of

    tls_port = systemd.implicit_tls_port(config.tls_port)
    inherited = systemd.inherited_listeners(tls_port)
    tls_kind = [i for i in inherited if i.kind == systemd.TLS]
    if tls_kind and not tls:
        names = ", ".join(f"{i.name} ({address_of(i.sock)})" for i in tls_kind)
        for listener in inherited:
            listener.sock.close()
        raise ValueError(f"systemd passed an implicit-TLS listener ({names}), but TLS is not configured "
                         "($tls_cert_file); configure it, or remove the listener from the socket unit "
                         "(or name it FileDescriptorName=pop3)")
    return [i.sock for i in inherited], [i.sock.fileno() for i in tls_kind]


def prepare_workers(config: Config) -> None:
    """A throw-away worker boot (lock directory included): raises ValueError if workers
    could not start, so the error is reported before detaching (or before a reload is
    accepted) rather than by a master that gives up after forking."""
    from tpops.worker import preflight

    reason = preflight(config)
    if reason is not None:
        raise ValueError(f"workers cannot start: {reason}")


def _stderr_to(log_files: logs.LogSetup) -> None:
    """A daemon's stderr (uncaught tracebacks) is ``$error_log``, the file now at that path."""
    if log_files.error_log is not None:
        os.dup2(log_files.error_log.fd, 2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
