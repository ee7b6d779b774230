"""``tpops --check-config`` checks what start-up would refuse, each as ``FILE:LINE: what is wrong``
(exit 2): users, groups, the MySQL query's placeholder, log and pid directories; and ``-f`` is
resolved once, so a relative path still names the same file later."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.marks import root_only
from tests.support.server import TPOPS, MailEnv

NO_USER = "no-such-user-tpops"


def check(conf: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPOPS, "--check-config", "-f", str(conf), *args], capture_output=True,
                          text=True, timeout=20, cwd=cwd, check=False)


def conf_with(mail_env: MailEnv, **settings: str) -> tuple[Path, int]:
    """The test config plus ``settings``; the line number of the last one."""
    mail_env.write_conf(**settings)
    lines = mail_env.conf.read_text().splitlines()
    last = max(i for i, line in enumerate(lines, 1) if line.split(" = ")[0][1:] in settings)
    return mail_env.conf, last


def test_a_clean_configuration_passes(mail_env: MailEnv) -> None:
    out = check(mail_env.conf)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert f"$error_log = '{mail_env.error_log}'\n" in out.stdout


def test_unknown_user(mail_env: MailEnv) -> None:
    conf, line = conf_with(mail_env, user=repr(NO_USER))
    out = check(conf)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"{conf}:{line}: $user: no such user: {NO_USER}\n"


def test_unknown_user_on_the_command_line(mail_env: MailEnv) -> None:
    out = check(mail_env.conf, "--user", NO_USER)
    assert out.returncode == 2
    assert out.stderr == f"command line: $user: no such user: {NO_USER}\n"


def test_unknown_group(mail_env: MailEnv) -> None:
    conf, line = conf_with(mail_env, user="'nobody'", group="'no-such-group-tpops'")
    out = check(conf)
    assert out.returncode == 2
    assert out.stderr == f"{conf}:{line}: $group: no such group: no-such-group-tpops\n"


def test_root_as_user(mail_env: MailEnv) -> None:
    conf, line = conf_with(mail_env, user="'root'")
    out = check(conf)
    assert out.returncode == 2
    assert out.stderr.startswith(f"{conf}:{line}: $user: 'root' is root; workers never run as root")


def test_group_without_user(mail_env: MailEnv) -> None:
    conf, line = conf_with(mail_env, group="'65534'")
    out = check(conf)
    assert out.returncode == 2
    assert out.stderr == f"{conf}:{line}: $group requires $user (the workers run as $user, in $group)\n"
    # Start-up refuses it the same way, before doing anything.
    started = subprocess.run([TPOPS, "--fg", "-f", str(conf), "--port", "0", "--bind", "127.0.0.1"],
                             capture_output=True, text=True, timeout=20, check=False)
    assert (started.returncode, started.stderr) == (2, out.stderr)
    # The file's $group with --user on the command line is complete.
    assert check(conf, "--user", "nobody").returncode == 0


def test_group_option_without_user(mail_env: MailEnv) -> None:
    out = check(mail_env.conf, "--group", "nogroup")
    assert out.returncode == 2
    assert out.stderr == "command line: $group requires $user (the workers run as $user, in $group)\n"


@pytest.mark.parametrize("query", ["select login,passwd,uid,maildir from user where login=login",
                                   "select login,passwd,uid,maildir from user where login='%d'"])
def test_mysql_query_without_placeholder(mail_env: MailEnv, query: str) -> None:
    conf, line = conf_with(mail_env, auth_type="'MySQL'", mysql_auth_query=repr(query))
    out = check(conf)
    assert out.returncode == 2
    assert out.stderr == f"{conf}:{line}: $mysql_auth_query has no %s where the login name goes\n"


def test_mysql_query_is_not_checked_for_other_backends(mail_env: MailEnv) -> None:
    conf, _ = conf_with(mail_env, mysql_auth_query="'select 1'")
    assert check(conf).returncode == 0


@pytest.mark.parametrize("name", ["error_log", "access_log", "pid_file"])
def test_log_file_in_a_missing_directory(mail_env: MailEnv, name: str) -> None:
    missing = mail_env.base / "nowhere"
    conf, line = conf_with(mail_env, **{name: repr(str(missing / "tpops.x"))})
    out = check(conf)
    assert out.returncode == 2
    assert out.stderr == f"{conf}:{line}: ${name}: directory {missing} does not exist\n"


def test_every_problem_is_reported(mail_env: MailEnv) -> None:
    mail_env.write_conf(user=repr(NO_USER), error_log="'/nonexistent-tpops/error.log'",
                        access_log="'/nonexistent-tpops/access.log'")
    out = check(mail_env.conf)
    assert out.returncode == 2
    assert [line.split(": ", 2)[1] for line in out.stderr.splitlines()] == [
        "$user", "$error_log", "$access_log"]


def test_relative_f_is_resolved_once(mail_env: MailEnv) -> None:
    mail_env.write_conf(port="'x'")
    out = check(Path("tpops.conf"), cwd=mail_env.base)
    assert out.returncode == 2
    assert out.stderr.startswith(f"{mail_env.conf}:")  # the absolute path of the same file


def test_a_certificate_that_does_not_load(mail_env: MailEnv, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    conf, line = conf_with(mail_env, tls_cert_file=repr(str(tmp_path / "cert.pem")),
                           tls_key_file=repr(str(tmp_path / "key.pem")))
    out = check(conf)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith(f"{conf}:{line}: {tmp_path / 'cert.pem'}: "), out.stderr


@root_only("--user")
def test_workers_that_could_not_read_the_passwd_file(mail_env: MailEnv) -> None:
    """The pre-flight worker runs as --user would: a root-only passwd-file is found now, not
    at the first login after the file changes."""
    mail_env.passwd_file.chmod(0o600)
    out = check(mail_env.conf, "--user", "nobody")
    assert (out.returncode, out.stdout) == (2, "")
    assert f"workers cannot start: $auth_file {mail_env.passwd_file} cannot be read as uid 65534" in out.stderr
