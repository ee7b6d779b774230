"""The command line and ``--inetd`` on plain pipes, against the real executable."""

from __future__ import annotations

import subprocess

from tests.support.server import REPO, TPOPS, MailEnv, make_message, run_inetd

from tpops import __version__


def test_version() -> None:
    out = subprocess.run([TPOPS, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"tpops {__version__}\n"


def test_help_names_every_seed_option() -> None:
    out = subprocess.run([TPOPS, "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("-f FILE", "--domain", "--fg", "--port", "--debug", "--version", "--inetd",
                   "--user", "--group", "--pidfile", "--bind", "--check-config"):
        assert option in out, option


def test_check_config_original_sample_loads() -> None:
    sample = REPO / "tests" / "data" / "tpops.conf.tpops051"
    out = subprocess.run([TPOPS, "--check-config", "-f", str(sample)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "$port = 110\n" in out.stdout
    assert "$syslog_facility = Syslog::LOG_MAIL\n" in out.stdout


def test_check_config_reports_file_and_line(tmp_path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("$port = 110\n$no_such = 1\n$max_use = 'x'\n")
    out = subprocess.run([TPOPS, "--check-config", "-f", str(conf)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{conf}:2:" in out.stderr and f"{conf}:3:" in out.stderr
    assert out.stdout == ""


def test_options_override_the_file(tmp_path) -> None:
    conf = tmp_path / "t.conf"
    conf.write_text("$port = 110\n")
    out = subprocess.run(
        [TPOPS, "--check-config", "-f", str(conf), "--port", "1110", "--domain", "example.org",
         "--debug", "--pidfile", "/tmp/x.pid", "--bind", "127.0.0.1"],
        capture_output=True, text=True, check=True,
    ).stdout
    for line in ("$port = 1110", "$default_domain = 'example.org'", "$debug = true",
                 "$pid_file = '/tmp/x.pid'", "$bind_address = '127.0.0.1'"):
        assert line + "\n" in out, line


def test_start_fails_on_bad_config(tmp_path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("$port = = 1\n")
    out = subprocess.run([TPOPS, "--fg", "-f", str(conf)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert f"{conf}:1:" in out.stderr


def test_inetd_session_on_pipes(mail_env: MailEnv) -> None:
    mail_env.add_user("ina", messages=[make_message("a", "body\n.line\n")])
    out = run_inetd(mail_env, b"USER ina\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split(b"\r\n")
    assert lines[0].startswith(b"+OK tpops ready.")
    assert lines[1].startswith(b"+OK")
    assert lines[2].startswith(b"+OK Logged in, 1 messages")
    size = int(lines[3].split()[2])
    assert lines[4] == f"+OK {size} octets".encode()
    assert b"\r\n..line\r\n.\r\n" in out.stdout
    assert out.stdout.endswith(b"+OK Bye, 1 messages deleted, 0 left.\r\n")
    assert mail_env.messages("ina") == []
    assert out.stderr == b""


def test_inetd_eof_deletes_nothing(mail_env: MailEnv) -> None:
    mail_env.add_user("inb", messages=[make_message()])
    out = run_inetd(mail_env, b"USER inb\r\nPASS secret\r\nDELE 1\r\n")
    assert out.returncode == 0
    assert b"+OK Message 1 deleted." in out.stdout
    assert len(mail_env.messages("inb")) == 1


def test_with_inetd_in_file_means_inetd(mail_env: MailEnv) -> None:
    mail_env.add_user("inc", messages=[make_message()])
    mail_env.write_conf(with_inetd="true")
    out = subprocess.run([TPOPS, "-f", str(mail_env.conf)], input=b"QUIT\r\n", capture_output=True, timeout=20)
    assert out.stdout.startswith(b"+OK tpops ready.")
    assert out.stdout.endswith(b"+OK Bye.\r\n")
