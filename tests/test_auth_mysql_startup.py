"""MySQL configuration errors stop start-up instead of failing every login (issue 8 item 12)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mariadb
from tests.support.server import TPOPS, MailEnv
from tpops.auth.mysql import MySQLAuthenticator
from tpops.config import Config

NEW_SQL = Path(__file__).resolve().parents[1] / "tpops_auth-mysql.sql"


@pytest.fixture(scope="module")
def db() -> Iterator[tuple[mariadb.Server, str]]:
    with mariadb.temp_database() as (srv, name):
        mariadb.load_sql(srv, name, str(NEW_SQL))
        yield srv, name


def mysql_config(srv: mariadb.Server, name: str, query: str) -> Config:
    return Config(auth_type="MySQL", mysql_server=srv.host, mysql_port=srv.port, mysql_user=srv.user,
                  mysql_pass=srv.password, mysql_db=name, mysql_auth_query=query)


def test_check_accepts_a_good_query_on_an_empty_table(db: tuple[mariadb.Server, str]) -> None:
    auth = MySQLAuthenticator(mysql_config(*db, "select login,passwd,uid,maildir from user where login=%s"))
    auth.check()  # no row matches '': the column count comes from the description
    auth.close()


@pytest.mark.parametrize(("query", "message"), [
    ("select login, passwd from user where login=%s",
     "$mysql_auth_query returns 2 columns; it must return login, passwd, uid, maildir (in that order)"),
    ("select login from nosuchtable where login=%s", "$mysql_auth_query fails on "),
    ("selec login,passwd,uid,maildir from user where login=%s", "You have an error in your SQL syntax"),
])
def test_check_refuses_a_query_that_would_fail_every_login(
    db: tuple[mariadb.Server, str], query: str, message: str
) -> None:
    auth = MySQLAuthenticator(mysql_config(*db, query))
    with pytest.raises(ValueError) as info:
        auth.check()
    assert message in str(info.value)
    auth.close()


def test_unreachable_server_does_not_stop_start_up(caplog: pytest.LogCaptureFixture) -> None:
    config = Config(auth_type="MySQL", mysql_server="127.0.0.1", mysql_port=mariadb.free_port(), mysql_db="x")
    auth = MySQLAuthenticator(config)
    auth.check()  # it may be back before the first login: logged, not fatal
    assert "not checked at start-up" in caplog.text
    auth.close()


def test_too_few_columns_is_a_start_up_error(mail_env: MailEnv, db: tuple[mariadb.Server, str]) -> None:
    srv, name = db
    mail_env.write_conf(
        auth_type="'MySQL'", mysql_server=repr(srv.host), mysql_port=str(srv.port), mysql_user=repr(srv.user),
        mysql_pass=repr(srv.password) if srv.password else "nil", mysql_db=repr(name),
        mysql_auth_query="'select login, passwd from user where login=%s'",
    )
    out = subprocess.run([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", "0", "--bind", "127.0.0.1"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert ("tpops: cannot start: workers cannot start: $mysql_auth_query returns 2 columns; "
            "it must return login, passwd, uid, maildir (in that order)") in out.stderr
    assert "Traceback" not in out.stderr
