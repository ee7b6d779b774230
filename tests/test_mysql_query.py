"""``$mysql_auth_query`` is tokenized: the login placeholder never inside a literal (issue 8 item 14)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.server import TPOPS, MailEnv
from tpops.auth.mysql import compile_query

TPOPS_ORIGINAL = "select login,passwd,uid,maildir from user where login='%s'"
CONFIG_DEFAULT = 'select login,passwd,uid,maildir from user where login="%s"'
COMPILED = "select login,passwd,uid,maildir from user where login=%s"


@pytest.mark.parametrize(("query", "compiled"), [
    (TPOPS_ORIGINAL, COMPILED),
    (CONFIG_DEFAULT, COMPILED),
    (COMPILED, COMPILED),
    ("select login,passwd,uid,maildir from user where login = %s and maildir like '/srv/%'",
     "select login,passwd,uid,maildir from user where login = %s and maildir like '/srv/%%'"),
    ("select login,passwd,uid,maildir from user where login='%s' and maildir like '/srv/%%'",
     "select login,passwd,uid,maildir from user where login=%s and maildir like '/srv/%%'"),
    ("select login,passwd,uid,CONCAT('/home/', %s, '/Maildir/') from user where login=%s and 1=0",
     None),  # two placeholders: refused below
    ("select 'it''s', \"a \\\"q\\\" %%s\", login,passwd,uid,maildir from user where login=%s",
     "select 'it''s', \"a \\\"q\\\" %%s\", login,passwd,uid,maildir from user where login=%s"),
    ("select `we``ird`, login,passwd,uid,maildir from user where login=%s # by login\n",
     "select `we``ird`, login,passwd,uid,maildir from user where login=%s # by login\n"),
    ("select login,passwd,uid,maildir from user -- 100% sure\nwhere login=%s",
     "select login,passwd,uid,maildir from user -- 100%% sure\nwhere login=%s"),
    ("select login,passwd,uid,maildir from user where login=%s/* 'not a literal */",
     "select login,passwd,uid,maildir from user where login=%s/* 'not a literal */"),
])
def test_accepted_queries(query: str, compiled: str | None) -> None:
    if compiled is None:
        with pytest.raises(ValueError, match="exactly once"):
            compile_query(query)
    else:
        assert compile_query(query) == compiled


@pytest.mark.parametrize(("query", "where"), [
    ("select login,passwd,uid,maildir from user where maildir='/home/%s/Maildir/'", "a string literal"),
    ('select login,passwd,uid,maildir from user where maildir="/home/%s/Maildir/"', "a string literal"),
    ("select login,passwd,uid,maildir from user where login='%s@example.org'", "a string literal"),
    ("select login,passwd,uid,maildir from user where login=' %s'", "a string literal"),
    ("select login,passwd,uid,maildir from user where login='it\\'s %s'", "a string literal"),
    ("select login,passwd,uid,maildir from user where login='it''s %s'", "a string literal"),
    ("select login,passwd,uid,maildir from user where login='%s''x'", "a string literal"),
    ("select login,passwd,uid,maildir from `%s` where login=%s", "an identifier"),
    ("select login,passwd,uid,maildir from user where login=%s -- %s\n", "a comment"),
    ("select login,passwd,uid,maildir from user where login=%s # %s", "a comment"),
    ("select login,passwd,uid,maildir from user /* %s */ where login=%s", "a comment"),
])
def test_placeholder_inside_a_literal_or_comment_is_refused(query: str, where: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_query(query)
    message = str(info.value)
    assert message.startswith(f"$mysql_auth_query: the login placeholder %s is inside {where} ")
    assert "CONCAT('/home/', %s, '/Maildir/')" in message


@pytest.mark.parametrize("query", [
    "select login,passwd,uid,maildir from user where login='%s",
    "select login,passwd,uid,maildir from user where login=%s and x='a\\'",
    "select login,passwd,uid,maildir from user where login=%s /* open",
])
def test_unterminated_literal_or_comment_is_refused(query: str) -> None:
    with pytest.raises(ValueError, match="unterminated"):
        compile_query(query)


def test_placeholder_in_a_literal_stops_start_up(mail_env: MailEnv) -> None:
    """The reproduced injection: '/home/%s/Maildir/' let a login close the quotes. Now tpops
    refuses to start, before any connection is made."""
    mail_env.write_conf(auth_type="'MySQL'", mysql_server="'127.0.0.1'", mysql_port="1",
                        mysql_auth_query="\"select login,passwd,uid,maildir from user where "
                                         "maildir='/home/%s/Maildir/'\"")
    out = subprocess.run([TPOPS, "--fg", "-f", str(mail_env.conf), "--port", "0", "--bind", "127.0.0.1"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert ("tpops: cannot start: workers cannot start: $mysql_auth_query: the login placeholder %s is "
            "inside a string literal '/home/%s/Maildir/'") in out.stderr
    assert "Traceback" not in out.stderr
