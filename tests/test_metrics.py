"""``$metrics_address``: Prometheus metrics from the exporter child, scraped during and after real sessions."""

from __future__ import annotations

import os
import re
import stat
import urllib.error
import urllib.request

import pytest

from tests.support.client import RawClient
from tests.support.marks import IS_ROOT
from tests.support.procs import wait_for
from tests.support.server import MailEnv, Server, free_port, make_message
from tpops.metrics import metrics_dir

MESSAGE = make_message("metrics", "y" * 500 + "\n")


def scrape(port: int) -> dict[str, float]:
    """Every sample of the exposition as ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_counters_move_by_what_the_sessions_did(mail_env: MailEnv) -> None:
    mail_env.add_user("tommy", messages=[MESSAGE, MESSAGE, MESSAGE])
    mport = free_port()
    mail_env.write_conf(metrics_address=f"'127.0.0.1:{mport}'", min_servers="2")
    srv = Server(mail_env).start()
    try:
        if IS_ROOT:  # the private directory: root's, not writable by the identity workers run as
            st = os.stat(metrics_dir(srv.port))
            assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o2750
        before = wait_for(lambda: scrape(mport))
        c = RawClient(srv.port)
        assert c.cmd("USER tommy").startswith(b"+OK")
        assert c.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
        assert c.login("tommy").startswith(b"+OK")
        status_line, body = c.multi("RETR 1")
        assert status_line.startswith(b"+OK")
        assert c.multi("TOP 2 0")[0].startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK") and c.cmd("DELE 3").startswith(b"+OK")
        during = scrape(mport)
        assert delta(during, before, 'tpops_logins_total{result="ok"}') == 1
        assert delta(during, before, 'tpops_logins_total{result="auth"}') == 1
        assert delta(during, before, 'tpops_commands_total{verb="DELE"}') == 2
        assert delta(during, before, 'tpops_messages_sent_total') == 2
        assert wait_for(lambda: delta(scrape(mport), before, "tpops_sent_octets_total") >= len(body))
        assert during['tpops_workers_busy'] >= 1
        assert c.cmd("QUIT").startswith(b"+OK")
        assert c.closed()
        c.close()
        after = wait_for(lambda: (s := scrape(mport)) and s.get("tpops_session_duration_seconds_count", 0)
                         > before.get("tpops_session_duration_seconds_count", 0) and s)
        assert delta(after, before, "tpops_connections_total") == 1
        assert delta(after, before, "tpops_messages_deleted_total") == 2
        assert delta(after, before, 'tpops_commands_total{verb="QUIT"}') == 1
        assert delta(after, before, 'tpops_commands_total{verb="USER"}') == 2
        assert delta(after, before, "tpops_session_duration_seconds_count") == 1
        assert delta(after, before, "tpops_auth_duration_seconds_count") == 2
        assert wait_for(lambda: (s := scrape(mport))["tpops_workers_busy"] == 0 and s["tpops_workers_idle"] >= 2)
        assert len(mail_env.messages("tommy")) == 1
    finally:
        srv.stop()
    with pytest.raises(urllib.error.URLError):  # the exporter stopped with the master
        scrape(mport)
    assert not os.path.exists(metrics_dir(srv.port))  # its files went with it (the next start empties it anyway)


def test_a_killed_worker_counts_as_a_restart_and_totals_survive_it(mail_env: MailEnv) -> None:
    mail_env.add_user("tommy", messages=[MESSAGE])
    mport = free_port()
    mail_env.write_conf(metrics_address=f"'127.0.0.1:{mport}'")
    srv = Server(mail_env).start()
    try:
        before = wait_for(lambda: scrape(mport))
        c = RawClient(srv.port)
        assert c.login("tommy").startswith(b"+OK")
        c.multi("RETR 1")
        # the worker counts a write once it returned: the client may have read it a moment before
        sent = wait_for(lambda: (v := scrape(mport)["tpops_sent_octets_total"]) > 500 and v)
        pid = int(re.search(rb"<(\d+)\.", c.greeting).group(1))  # the worker's pid is in the APOP stamp
        os.kill(pid, 9)
        after = wait_for(lambda: (s := scrape(mport)) and s["tpops_worker_restarts_total"] >= 1 and s)
        assert delta(after, before, "tpops_worker_restarts_total") == 1
        assert after["tpops_sent_octets_total"] == sent  # the dead worker's counts stay
        c.close()
    finally:
        srv.stop()


def _finished_process_files(directory: str) -> list[str]:
    """Counter and histogram files of processes that no longer exist (the archive, pid 0, aside)."""
    out = []
    for name in os.listdir(directory):
        kind, _, rest = name.partition("_")
        if kind in ("counter", "histogram") and rest.endswith(".db") and rest[:-3].isdigit() and rest != "0.db":
            try:
                os.kill(int(rest[:-3]), 0)
            except ProcessLookupError:
                out.append(name)
    return out


@pytest.mark.timeout(120)
def test_files_of_finished_workers_are_folded_and_no_total_ever_drops(mail_env: MailEnv) -> None:
    """With ``$max_use = 1`` every session ends its worker, which leaves a counter and a
    histogram file behind. The master folds them into one archive per type; the totals
    are the same afterwards, and no scrape meanwhile sees one drop."""
    mail_env.add_user("tommy", messages=[MESSAGE])
    mport = free_port()
    mail_env.write_conf(metrics_address=f"'127.0.0.1:{mport}'", max_use="1", min_servers="2", max_servers="4")
    srv = Server(mail_env).start()
    watched = ("tpops_connections_total", 'tpops_logins_total{result="ok"}', 'tpops_commands_total{verb="QUIT"}',
               "tpops_session_duration_seconds_count", 'tpops_session_duration_seconds_bucket{le="+Inf"}',
               "tpops_auth_duration_seconds_count", "tpops_sent_octets_total")
    try:
        directory = metrics_dir(srv.port)
        before = wait_for(lambda: scrape(mport))
        last = before

        def no_drop() -> dict[str, float]:
            nonlocal last
            now = scrape(mport)
            for name in watched:
                assert now.get(name, 0.0) >= last.get(name, 0.0), (name, last.get(name), now.get(name))
            last = now
            return now

        sessions = 8
        for _ in range(sessions):
            c = RawClient(srv.port)
            assert c.login("tommy").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
            assert c.closed()
            c.close()
            no_drop()
        assert wait_for(lambda: _finished_process_files(directory), what="files of finished workers")
        wait_for(lambda: no_drop() and not _finished_process_files(directory), timeout=40,
                 what="the master folding the files of finished workers")
        assert {"counter_0.db", "histogram_0.db"} <= set(os.listdir(directory))
        after = wait_for(lambda: (s := no_drop())["tpops_session_duration_seconds_count"]
                         - before.get("tpops_session_duration_seconds_count", 0.0) >= sessions and s)
        for name in watched[:-1]:
            assert delta(after, before, name) == sessions, name
        assert delta(after, before, "tpops_sent_octets_total") > 0
        assert delta(after, before, "tpops_session_duration_seconds_sum") > 0
    finally:
        srv.stop()


def test_a_scrape_survives_a_process_creating_its_file(mail_env: MailEnv) -> None:
    """A new process (a worker, a post-login spare) creates its multiprocess file empty
    and sizes it a moment later; a scrape in between used to fail (the exporter closed
    the connection without an answer). Files that do not read whole are skipped."""
    mail_env.add_user("tommy", messages=[MESSAGE])
    mport = free_port()
    mail_env.write_conf(metrics_address=f"'127.0.0.1:{mport}'")
    srv = Server(mail_env).start()
    try:
        wait_for(lambda: scrape(mport))
        directory = metrics_dir(srv.port)
        for name, data in (("counter_999999.db", b""), ("histogram_999998.db", b"\x40\x00")):
            path = os.path.join(directory, name)  # empty, and cut short after its first octets
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
        for _ in range(3):
            samples = scrape(mport)
            assert "tpops_connections_total" in samples
    finally:
        srv.stop()


def test_check_config_refuses_a_bad_metrics_address_and_a_relative_control_socket() -> None:
    from tpops.config import Config, check_config

    assert check_config(Config(metrics_address="9110")) == [
        "$metrics_address: expected HOST:PORT (e.g. '127.0.0.1:9110'), got '9110'"]
    assert check_config(Config(metrics_address="[::1]:70000")) == ["$metrics_address: port 70000 is out of range"]
    assert check_config(Config(metrics_address="[::1]:9110", control_socket="/run/x")) == []
    assert check_config(Config(control_socket="run/x")) == ["$control_socket must be an absolute path"]
