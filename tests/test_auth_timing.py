"""Unknown users cost what real users of the majority scheme cost (issue 8 items 12, 13)."""

from __future__ import annotations

import statistics
import sys
import time

import pytest
from passlib.hash import argon2, bcrypt, ldap_salted_sha1, sha512_crypt

from tests.support.client import RawClient
from tests.support.server import MailEnv, Server
from tpops.auth import hashes

TRIES = 50


def test_tally_picks_the_majority_scheme_and_cost() -> None:
    tally = hashes.SchemeTally()
    assert tally.template() is None
    b10 = [bcrypt.using(rounds=10).hash(f"pw{i}") for i in range(3)]
    b12 = bcrypt.using(rounds=12).hash("pw")
    sha = sha512_crypt.hash("pw")
    for stored in ("{PLAIN}a", "{PLAIN}b", "{PLAIN}c", "{PLAIN}d", sha, b12, *b10):
        tally.add(stored)
    assert tally.template() == b10[0]  # clear text is not counted; bcrypt cost 10 is the majority
    assert hashes.cost_class(b10[1]) == hashes.cost_class(b10[2]) != hashes.cost_class(b12)
    assert hashes.cost_class("{PLAIN}x") == "plain"
    assert hashes.cost_class("{NOPE}x") is None


@pytest.mark.parametrize("stored", [
    bcrypt.using(rounds=10).hash("pw"),
    "{ARGON2ID}" + argon2.using(memory_cost=8192, rounds=2).hash("pw"),
    "{SSHA}" + ldap_salted_sha1.hash("pw")[len("{SSHA}"):],
    "{SHA512-CRYPT}" + sha512_crypt.using(rounds=20000).hash("pw"),
    "$y$j9T$Fbc1N4UNRZPb1ma.Wp7jz1Qa$JCxRDAqi8ta5kLgx8hrf1L4eRDbkxRH6aqB4b1AX1J8",
])
def test_dummy_costs_what_the_template_costs(stored: str) -> None:
    """The dummy check for an unknown user burns the CPU a real check of the template costs.

    Measured as this process's CPU time (other processes on a loaded machine do not count)
    with the two checks interleaved, the cheapest of nine runs each: the cost itself, not
    the scheduler's noise (wall-clock medians failed here under load)."""
    real_times, dummy_times = [], []
    for _ in range(9):
        for fn, times in ((lambda: hashes.verify_password(b"wrong", stored), real_times),
                          (lambda: hashes.dummy_verify(b"wrong", stored), dummy_times)):
            began = time.process_time()
            fn()
            times.append(time.process_time() - began)
    real, dummy = min(real_times), min(dummy_times)
    assert abs(dummy - real) <= max(0.25 * real, 0.002), (real, dummy)


def test_dummy_never_raises_without_a_crypt_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.13 without crypt_r: yescrypt cannot be computed; the dummy must still work."""
    def missing() -> object:
        raise ImportError("system crypt(3) needs the crypt-r package on Python 3.13+: pip install crypt-r")

    monkeypatch.setattr(hashes, "_crypt_module", missing)
    yescrypt = "$y$j9T$Fbc1N4UNRZPb1ma.Wp7jz1Qa$JCxRDAqi8ta5kLgx8hrf1L4eRDbkxRH6aqB4b1AX1J8"
    began = time.perf_counter()
    hashes.dummy_verify(b"pw", yescrypt)
    hashes.dummy_crypt_verify(b"pw")
    assert time.perf_counter() - began > 0.001  # the sha512-crypt fallback still did the work
    assert sys.version_info >= (3, 0)


def test_unknown_user_and_wrong_password_take_the_same_time(mail_env: MailEnv) -> None:
    """Over the wire, $error_interval = 0, a bcrypt user: median of 50 interleaved tries each."""
    stored = bcrypt.using(rounds=10).hash("right password")
    mail_env.add_user("bea", stored, scheme="")
    mail_env.add_user("plain", "secret")  # clear-text users do not change the majority
    mail_env.write_conf(max_auth_failures="1000", min_servers="1", max_servers="2")
    srv = Server(mail_env).start()
    try:
        client = RawClient(srv.port, timeout=30)
        unknown: list[float] = []
        wrong: list[float] = []
        for i in range(2 * TRIES):
            login, bucket = ("nobody-here", unknown) if i % 2 == 0 else ("bea", wrong)
            assert client.cmd(f"USER {login}").startswith(b"+OK")
            began = time.perf_counter()
            reply = client.cmd("PASS wrong password")
            bucket.append(time.perf_counter() - began)
            assert reply == b"-ERR [AUTH] Authentication failed."
        client.close()
    finally:
        srv.stop()
    u, w = statistics.median(unknown), statistics.median(wrong)
    assert w > 0.01, w  # bcrypt cost 10 really ran
    assert abs(u - w) / w < 0.10, (u, w)
