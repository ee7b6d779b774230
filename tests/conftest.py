"""pytest fixtures and hooks; the helpers they use live in tests/support/.

Tests talk to the real server over the wire: ``mail_env`` gives a :class:`MailEnv`
(passwd-file, Maildirs, tpops.conf) in a temporary directory, ``server`` a started
:class:`Server` for it. The ``root_only`` mark (tests.support.marks) is applied here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.marks import IN_CI, IS_ROOT
from tests.support.server import MailEnv, Server


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply ``root_only``: skip as an ordinary user, fail in CI (which must run as root)."""
    mark = item.get_closest_marker("root_only")
    if mark is None or IS_ROOT:
        return
    why = mark.args[0] if mark.args else "root"
    if IN_CI:
        pytest.fail(f"needs root ({why}) and CI must run as root", pytrace=False)
    pytest.skip(f"needs root: {why} (CI runs as root)")


@pytest.fixture
def mail_env() -> Iterator[MailEnv]:
    """A fresh :class:`MailEnv` in a temporary directory, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tpops-test-"))
    base.chmod(0o755)
    try:
        yield MailEnv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)

@pytest.fixture
def server(mail_env: MailEnv) -> Iterator[Server]:
    """A started ``tpops --fg`` serving ``mail_env``, stopped afterwards."""
    srv = Server(mail_env).start()
    try:
        yield srv
    finally:
        srv.stop()
