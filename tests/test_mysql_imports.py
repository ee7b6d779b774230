"""The MySQL backend imports nothing after prepare(): a worker under --user may not be able to
(issue 8 item 20: ``No module named 'decimal'`` at the first connect under a 0700 pyenv home)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mariadb

NEW_SQL = Path(__file__).resolve().parents[1] / "tpops_auth-mysql.sql"

#: After prepare(), any import of a module not loaded yet raises: what a worker that dropped
#: privileges would hit if the interpreter's files were out of its reach.
CHILD = textwrap.dedent(
    """
    import sys
    from tpops.config import Config
    from tpops.auth import make_authenticator

    host, port, user, password, db = sys.argv[1:6]
    auth = make_authenticator(Config(auth_type="MySQL", mysql_server=host, mysql_port=int(port),
                                     mysql_user=user, mysql_pass=password, mysql_db=db))
    auth.prepare()

    class NoImports:
        def find_spec(self, name, path=None, target=None):
            raise ImportError(f"imported after prepare(): {name}")

    sys.meta_path.insert(0, NoImports())
    auth.check()
    found = auth.authenticate("tommy", b"pw")
    assert found is not None
    assert auth.authenticate("tommy", b"wrong") is None
    assert auth.authenticate("nosuch", b"pw") is None
    assert auth.authenticate_apop("tommy", "<1.2@x>", "0" * 32) is None
    lock = auth.lock(found)
    assert lock.still_held()
    lock.release()
    auth.close()
    print("no imports")
    """
)


@pytest.fixture(scope="module")
def db() -> Iterator[tuple[mariadb.Server, str]]:
    with mariadb.temp_database() as (srv, name):
        mariadb.load_sql(srv, name, str(NEW_SQL))
        conn = srv.connect(name)
        try:
            conn.cursor().execute(
                "insert into user (login, passwd, mail, maildir, quota) values (%s, %s, %s, %s, 0)",
                ("tommy", "{PLAIN}pw", "tommy@example.org", "/srv/mail/tommy"))
        finally:
            conn.close()
        yield srv, name


def test_no_import_after_prepare(db: tuple[mariadb.Server, str]) -> None:
    srv, name = db
    out = subprocess.run([sys.executable, "-c", CHILD, srv.host, str(srv.port), srv.user, srv.password, name],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no imports"
