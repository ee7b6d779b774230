"""Unit tests of tpops.sasl: every mechanism against a real client side, base64, SASLprep, Dovecot SCRAM."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import scramp

from tests.support.tlscerts import issue
from tpops import sasl, tls
from tpops.auth.base import AuthUnavailable, MailUser
from tpops.sasl import (
    BackendCaps,
    BadBase64,
    Challenge,
    Failure,
    Success,
    decode_initial_response,
    decode_response,
    encode_challenge,
    make_mechanism,
    mechanisms_for,
    saslprep,
)

HOST = "pop.example.org"
TOMMY = MailUser("tommy@example.org", "/srv/mail/tommy")
HASHED = MailUser("hashed@example.org", "/srv/mail/hashed")
STORED = MailUser("stored@example.org", "/srv/mail/stored")
UNICODE = MailUser("zoë@example.org", "/srv/mail/zoe")


class Backend:
    """A SaslBackend like the File authenticator: a {PLAIN} user, a hashed one, a
    {SCRAM-SHA-256} one; logins without a domain get ``example.org``."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple[str, str]] = []
        salted = hashlib.sha256(b"salt" + b"hash secret").hexdigest()
        self.hashes = {"hashed@example.org": salted}
        self.clear = {"tommy@example.org": b"tommy's secret", "zoë@example.org": b"p\xc3\xa4ss"}
        self.scram = {"stored@example.org": sasl.format_dovecot_scram(
            sasl.make_scram_credentials("stored secret"))}
        self.users = {u.login: u for u in (TOMMY, HASHED, STORED, UNICODE)}

    def _login(self, login: str, call: str) -> str:
        if self.down:
            raise AuthUnavailable("database down")
        self.calls.append((call, login))
        return login if "@" in login else f"{login}@example.org"

    def authenticate(self, login: str, password: bytes) -> MailUser | None:
        login = self._login(login, "authenticate")
        if login in self.clear:
            ok = hmac.compare_digest(self.clear[login], password)
        elif login in self.hashes:
            ok = hashlib.sha256(b"salt" + password).hexdigest() == self.hashes[login]
        elif login in self.scram:
            creds = sasl.parse_dovecot_scram(self.scram[login])
            try:
                ok = sasl.make_scram_credentials(password, salt=creds.salt) == creds
            except ValueError:
                ok = False
        else:
            ok = False
        return self.users[login] if ok else None

    def clear_secret(self, login: str) -> tuple[MailUser, bytes] | None:
        login = self._login(login, "clear_secret")
        return (self.users[login], self.clear[login]) if login in self.clear else None

    def scram_credentials(self, login: str) -> tuple[MailUser, sasl.ScramCredentials | bytes] | None:
        login = self._login(login, "scram_credentials")
        if login in self.scram:
            return self.users[login], sasl.parse_dovecot_scram(self.scram[login])
        return (self.users[login], self.clear[login]) if login in self.clear else None


Client = Callable[[bytes], bytes]


def exchange(name: str, initial: bytes | None, client: Client, *, backend: Backend | None = None,
             end_point: bytes | None = None) -> tuple[sasl.Outcome, list[bytes]]:
    """Drive one exchange as the session's AUTH loop does, over base64 as on the wire."""
    mech = make_mechanism(name, backend or Backend(), hostname=HOST, end_point=end_point)
    if initial is not None:  # the AUTH argument, as the client would send it
        initial = decode_initial_response(base64.b64encode(initial).decode() or "=")
    outcome = mech.start(initial)
    challenges: list[bytes] = []
    while isinstance(outcome, Challenge):
        line = encode_challenge(outcome.data)  # "+ " + line
        challenges.append(base64.b64decode(line))
        outcome = mech.step(decode_response(base64.b64encode(client(challenges[-1])).decode()))
        assert len(challenges) < 10
    return outcome, challenges


def answers(*replies: bytes) -> Client:
    queue = list(replies)
    return lambda challenge: queue.pop(0)


# ---------------------------------------------------------------- base64 and the offer

def test_decode_helpers_are_strict() -> None:
    assert decode_initial_response("=") == b""
    assert decode_response("") == b""
    assert decode_response("AHRvbW15AHNlY3JldA==") == b"\0tommy\0secret"
    assert decode_initial_response(b"dXNlcg==") == b"user"
    for bad in ("dXNlcg", "dXNlcg=", "dXN lcg==", "dXNlcg==\n", "d*Nlcg==", "é===", "=", "====x"):
        with pytest.raises(BadBase64):
            decode_response(bad)
    assert encode_challenge(b"") == ""
    assert encode_challenge(b"Username:") == "VXNlcm5hbWU6"
    assert encode_challenge(b"Password:") == "UGFzc3dvcmQ6"


@pytest.mark.parametrize(("caps", "plaintext", "binding", "offered"), [
    (BackendCaps(), True, False, ("PLAIN", "LOGIN")),
    (BackendCaps(), False, True, ()),
    (BackendCaps(clear_secrets=True), True, False,
     ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")),
    (BackendCaps(clear_secrets=True), False, False, ("SCRAM-SHA-256", "CRAM-MD5")),
    (BackendCaps(clear_secrets=True, scram=True), True, True,
     ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")),
    (BackendCaps(scram=True), False, True, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
])
def test_mechanisms_for(caps: BackendCaps, plaintext: bool, binding: bool,
                        offered: tuple[str, ...]) -> None:
    assert mechanisms_for(caps, plaintext_allowed=plaintext, channel_binding=binding) == offered
    assert set(offered) <= set(sasl.MECHANISMS)


def test_unknown_mechanism_and_case() -> None:
    with pytest.raises(KeyError):
        make_mechanism("DIGEST-MD5", Backend(), hostname=HOST)
    assert make_mechanism("plain", Backend(), hostname=HOST).name == "PLAIN"


# ---------------------------------------------------------------- PLAIN

def test_plain_right_and_wrong() -> None:
    outcome, challenges = exchange("PLAIN", b"\0tommy\0tommy's secret", answers())
    assert outcome == Success(TOMMY) and challenges == []
    outcome, _ = exchange("PLAIN", b"\0tommy\0wrong", answers())
    assert outcome == Failure("PLAIN: wrong password or unknown user", "tommy")
    outcome, _ = exchange("PLAIN", b"\0hashed\0hash secret", answers())
    assert outcome == Success(HASHED)  # hashed passwords work with PLAIN (not with CRAM/SCRAM)
    outcome, _ = exchange("PLAIN", b"\0nobody\0x", answers())
    assert isinstance(outcome, Failure)


def test_plain_without_initial_response_gets_an_empty_challenge() -> None:
    outcome, challenges = exchange("PLAIN", None, answers(b"\0tommy\0tommy's secret"))
    assert challenges == [b""] and outcome == Success(TOMMY)


def test_plain_authzid() -> None:
    outcome, _ = exchange("PLAIN", b"tommy\0tommy\0tommy's secret", answers())
    assert outcome == Success(TOMMY)
    backend = Backend()
    outcome, _ = exchange("PLAIN", b"admin\0tommy\0tommy's secret", answers(), backend=backend)
    assert outcome == Failure("PLAIN: authorization identity 'admin' differs from "
                              "authentication identity 'tommy'", "tommy")
    assert backend.calls == []  # refused before any password check


@pytest.mark.parametrize(("message", "reason"), [
    (b"tommy\0tommy's secret", "PLAIN: malformed message (expected authzid NUL authcid NUL password)"),
    (b"\0tommy\0tommy's\0secret", "PLAIN: malformed message (expected authzid NUL authcid NUL password)"),
    (b"\0tommy\0", "PLAIN: empty password"),
    (b"\0\0secret", "PLAIN: empty user name"),
    (b"\0tom\xffmy\0secret", "PLAIN: user name is not valid UTF-8"),
    (b"\0tom\x07my\0secret", "PLAIN: user name 'tom\\x07my' refused by SASLprep: "
                             "prohibited ASCII control character U+0007"),
    (b"\0tom\r\nmy\0secret", "PLAIN: user name 'tom\\x0d\\x0amy' refused by SASLprep: "
                             "prohibited ASCII control character U+000D"),
    (b"\0" + b"t" * 256 + b"\0secret", "PLAIN: a field exceeds 255 octets (RFC 4616 2)"),
])
def test_plain_malformed(message: bytes, reason: str) -> None:
    outcome, _ = exchange("PLAIN", message, answers())
    assert isinstance(outcome, Failure) and outcome.reason == reason
    assert "secret" not in outcome.reason


def test_plain_saslprep_on_the_user_name_not_the_password() -> None:
    # Soft hyphen in the name is mapped to nothing (RFC 4013 example 1).
    outcome, _ = exchange("PLAIN", "\0tom\u00admy\0tommy's secret".encode(), answers())
    assert outcome == Success(TOMMY)
    # A password goes to authenticate() as sent, as with PASS.
    outcome, _ = exchange("PLAIN", "\0zoë\0p\u00e4ss".encode(), answers())
    assert outcome == Success(UNICODE)
    outcome, _ = exchange("PLAIN", "\0zoe\u0308\0p\u00e4ss".encode(), answers())  # NFKC: ë
    assert outcome == Success(UNICODE)


def test_backend_trouble_is_not_a_failed_login() -> None:
    backend = Backend()
    backend.down = True
    for name, initial, client in [
        ("PLAIN", b"\0tommy\0x", answers()),
        ("LOGIN", None, answers(b"tommy", b"x")),
        ("SCRAM-SHA-256", None, scram_client("tommy", "x")[1]),
    ]:
        with pytest.raises(AuthUnavailable, match="database down"):
            exchange(name, initial, client, backend=backend)


# ---------------------------------------------------------------- LOGIN

def test_login_right_and_wrong() -> None:
    outcome, challenges = exchange("LOGIN", None, answers(b"tommy", b"tommy's secret"))
    assert challenges == [b"Username:", b"Password:"] and outcome == Success(TOMMY)
    outcome, challenges = exchange("LOGIN", b"tommy", answers(b"tommy's secret"))
    assert challenges == [b"Password:"] and outcome == Success(TOMMY)
    outcome, _ = exchange("LOGIN", None, answers(b"tommy", b"nope"))
    assert outcome == Failure("LOGIN: wrong password or unknown user", "tommy")
    outcome, _ = exchange("LOGIN", None, answers(b"tommy", b""))
    assert outcome == Failure("LOGIN: empty password", "tommy")
    outcome, _ = exchange("LOGIN", None, answers(b"tom\nmy"))
    assert outcome == Failure("LOGIN: user name 'tom\\x0amy' contains control characters")


# ---------------------------------------------------------------- CRAM-MD5

def cram_client(login: bytes, secret: bytes) -> Client:
    return lambda challenge: login + b" " + hmac.new(secret, challenge, hashlib.md5).hexdigest().encode()


def test_cram_md5_right_and_wrong() -> None:
    outcome, challenges = exchange("CRAM-MD5", None, cram_client(b"tommy", b"tommy's secret"))
    assert outcome == Success(TOMMY)
    assert re.fullmatch(rb"<\d+\.\d+@pop\.example\.org>", challenges[0])
    outcome, _ = exchange("CRAM-MD5", None, cram_client(b"tommy", b"guess"))
    assert outcome == Failure("CRAM-MD5: wrong digest, unknown user or no clear-text secret", "tommy")
    # A user with only a hash cannot use CRAM-MD5, whatever the client knows.
    outcome, _ = exchange("CRAM-MD5", None, cram_client(b"hashed", b"hash secret"))
    assert isinstance(outcome, Failure) and outcome.login == "hashed"


def test_cram_md5_challenges_differ_and_uppercase_digest() -> None:
    one = make_mechanism("CRAM-MD5", Backend(), hostname=HOST).start(None)
    two = make_mechanism("CRAM-MD5", Backend(), hostname=HOST).start(None)
    assert isinstance(one, Challenge) and isinstance(two, Challenge) and one.data != two.data
    outcome, _ = exchange("CRAM-MD5", None,
                          lambda c: cram_client(b"tommy", b"tommy's secret")(c).upper()
                          .replace(b"TOMMY", b"tommy"))
    assert outcome == Success(TOMMY)


@pytest.mark.parametrize("response", [b"tommy", b"tommy 1234", b"tommy " + b"g" * 32, b""])
def test_cram_md5_malformed(response: bytes) -> None:
    outcome, _ = exchange("CRAM-MD5", None, answers(response))
    assert outcome == Failure("CRAM-MD5: malformed response (expected 'user hexdigest')")


def test_cram_md5_refuses_an_initial_response() -> None:
    outcome, challenges = exchange("CRAM-MD5", b"tommy", answers())
    assert challenges == [] and isinstance(outcome, Failure)
    assert "initial response" in outcome.reason


# ---------------------------------------------------------------- SCRAM-SHA-256

def scram_client(login: str, password: str, *, mechanism: str = "SCRAM-SHA-256",
                 binding: tuple[str, object] | None = None
                 ) -> tuple[scramp.ScramClient, Client]:
    """scramp's client; the Client callable answers each server challenge in turn."""
    client = scramp.ScramClient([mechanism], login, password, channel_binding=binding)
    state = {"step": 0}

    def answer(challenge: bytes) -> bytes:
        state["step"] += 1
        if state["step"] == 1:
            assert challenge == b""
            return client.get_client_first().encode()
        if state["step"] == 2:
            client.set_server_first(challenge.decode())
            return client.get_client_final().encode()
        client.set_server_final(challenge.decode())  # raises unless the server proved itself
        return b""

    return client, answer


@pytest.mark.parametrize(("login", "password", "user"), [
    ("tommy", "tommy's secret", TOMMY),           # derived from a clear secret
    ("stored", "stored secret", STORED),          # stored {SCRAM-SHA-256}
    ("zoë", "p\u00e4ss", UNICODE),
])
def test_scram_right(login: str, password: str, user: MailUser) -> None:
    client, answer = scram_client(login, password)
    backend = Backend()
    outcome, challenges = exchange("SCRAM-SHA-256", None, answer, backend=backend)
    assert outcome == Success(user)
    assert len(challenges) == 3 and challenges[2].startswith(b"v=")  # server-final, then +OK
    assert client.stage == scramp.core.ClientStage.set_server_final
    assert backend.calls == [("scram_credentials", login)]  # one lookup, whichever kind of secret


def test_scram_with_initial_response() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "tommy", "tommy's secret")
    first = client.get_client_first().encode()

    def answer(challenge: bytes) -> bytes:
        if challenge.startswith(b"r="):
            client.set_server_first(challenge.decode())
            return client.get_client_final().encode()
        client.set_server_final(challenge.decode())
        return b""

    outcome, challenges = exchange("SCRAM-SHA-256", first, answer)
    assert outcome == Success(TOMMY) and len(challenges) == 2


@pytest.mark.parametrize(("login", "reason"), [
    ("tommy", "SCRAM-SHA-256: The client keys don't match.: invalid-proof"),
    ("stored", "SCRAM-SHA-256: The client keys don't match.: invalid-proof"),
    ("hashed", "SCRAM-SHA-256: unknown user or no usable secret"),
    ("nobody", "SCRAM-SHA-256: unknown user or no usable secret"),
])
def test_scram_wrong(login: str, reason: str) -> None:
    _, answer = scram_client(login, "wrong")
    backend = Backend()
    outcome, challenges = exchange("SCRAM-SHA-256", None, answer, backend=backend)
    assert outcome == Failure(reason, login)
    assert backend.calls == [("scram_credentials", login)]  # an unknown user is looked up (and logged) once
    # An unknown user is not revealed by the first step: salt and iterations come back.
    assert re.fullmatch(rb"r=[^,]+,s=[A-Za-z0-9+/=]{24},i=4096", challenges[1])


def test_scram_unknown_user_salt_is_stable() -> None:
    salts = []
    for _ in range(2):
        _, answer = scram_client("nobody", "x")
        _, challenges = exchange("SCRAM-SHA-256", None, answer)
        salts.append(challenges[1].split(b",")[1])
    assert salts[0] == salts[1]


def test_scram_data_after_server_final_fails() -> None:
    _, answer = scram_client("tommy", "tommy's secret")
    outcome, _ = exchange("SCRAM-SHA-256", None, lambda c: answer(c) or b"extra")
    assert outcome == Failure("SCRAM-SHA-256: unexpected data after server-final", "tommy")


@pytest.mark.parametrize(("first", "words"), [
    (b"n,a=admin,n=tommy,r=abcdefgh", "authzid must be empty"),
    (b"p=tls-server-end-point,,n=tommy,r=abcdefgh", "non-PLUS mechanism"),
    (b"n,,n=tommy", "Malformed"),
    (b"x,,n=tommy,r=abc", "GS2 flag"),
    (b"n,,n=tom\xff,r=abc", "not valid UTF-8"),
])
def test_scram_malformed_client_first(first: bytes, words: str) -> None:
    outcome, _ = exchange("SCRAM-SHA-256", first, answers())
    assert isinstance(outcome, Failure) and words in outcome.reason


def test_scram_y_flag_is_a_downgrade_when_plus_is_offered() -> None:
    # The client supports binding but thinks the server does not ("y"): RFC 5802 6.
    client = scramp.ScramClient(["SCRAM-SHA-256"], "tommy", "tommy's secret")
    first = client.get_client_first().replace("n,,", "y,,", 1).encode()
    outcome, _ = exchange("SCRAM-SHA-256", first, answers(), end_point=b"\1" * 32)
    assert isinstance(outcome, Failure) and "channel binding" in outcome.reason
    # Without TLS, "y" is the honest answer: the exchange goes on to server-first.
    mech = make_mechanism("SCRAM-SHA-256", Backend(), hostname=HOST)
    assert mech.start(None) == Challenge(b"")
    outcome = mech.step(first)
    assert isinstance(outcome, Challenge) and outcome.data.startswith(b"r=")


# ---------------------------------------------------------------- SCRAM-SHA-256-PLUS

def test_scram_plus_over_a_real_tls_connection(tmp_path: Path) -> None:
    certs = issue(tmp_path, "ecdsa")
    server = tls.load_server_tls(str(certs.cert_file), str(certs.key_file))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    done = threading.Event()

    def serve() -> None:
        with server.context.wrap_socket(b, server_side=True) as conn:
            conn.sendall(b"+OK\r\n")
            conn.recv(10)
            done.set()

    threading.Thread(target=serve, daemon=True).start()
    with certs.client_context().wrap_socket(a, server_hostname="localhost") as conn:
        assert conn.recv(10) == b"+OK\r\n"
        # scramp computes the binding from the certificate the client received.
        _, answer = scram_client("tommy", "tommy's secret", mechanism="SCRAM-SHA-256-PLUS",
                                 binding=("tls-server-end-point", conn))
        outcome, challenges = exchange("SCRAM-SHA-256-PLUS", None, answer,
                                       end_point=server.end_point)
        assert outcome == Success(TOMMY)
        assert challenges[1].startswith(b"r=")
    done.wait(10)


def test_scram_plus_wrong_binding_fails() -> None:
    _, answer = scram_client("tommy", "tommy's secret", mechanism="SCRAM-SHA-256-PLUS",
                             binding=("tls-server-end-point", b"\2" * 32))
    outcome, _ = exchange("SCRAM-SHA-256-PLUS", None, answer, end_point=b"\1" * 32)
    assert isinstance(outcome, Failure) and "channel bindings don't match" in outcome.reason


def test_scram_plus_needs_end_point_and_a_binding_client() -> None:
    with pytest.raises(ValueError):
        make_mechanism("SCRAM-SHA-256-PLUS", Backend(), hostname=HOST, end_point=None)
    _, answer = scram_client("tommy", "tommy's secret")  # "n": no binding
    outcome, _ = exchange("SCRAM-SHA-256-PLUS", None, answer, end_point=b"\1" * 32)
    assert isinstance(outcome, Failure) and "channel binding" in outcome.reason


# ---------------------------------------------------------------- Dovecot {SCRAM-SHA-256}

def test_credentials_match_the_rfc_7677_example() -> None:
    """make_scram_credentials + Dovecot format reproduce RFC 7677 3 byte for byte."""
    creds = sasl.make_scram_credentials("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    stored = sasl.format_dovecot_scram(creds)
    assert stored.startswith("{SCRAM-SHA-256}4096,W22ZaJ0SNY7soEsUEjb6gQ==,")
    back = sasl.parse_dovecot_scram(stored)
    assert back == creds
    server = scramp.ScramMechanism("SCRAM-SHA-256").make_server(
        lambda user: (back.salt, back.stored_key, back.server_key, back.iterations),
        s_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    server.set_client_first("n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert server.get_server_first() == (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    server.set_client_final("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert server.get_server_final() == "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_credentials_by_hand() -> None:
    """StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword, "Server Key")."""
    salt = b"0123456789abcdef"
    creds = sasl.make_scram_credentials(b"secret", salt=salt, iterations=5000)
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", salt, 5000)
    assert creds.stored_key == hashlib.sha256(
        hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    assert creds.server_key == hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    assert creds.iterations == 5000 and len(sasl.make_scram_credentials("x").salt) == 16
    # Without the prefix, as Dovecot's passdb hands the scheme body over.
    assert sasl.parse_dovecot_scram(sasl.format_dovecot_scram(creds).split("}", 1)[1]) == creds


@pytest.mark.parametrize(("value", "words"), [
    ("{SCRAM-SHA-256}4096,c2FsdA==,AAAA", "iterations,salt,StoredKey,ServerKey"),
    ("{SCRAM-SHA-256}abc,c2FsdHNhbHRzYWx0,AAAA,AAAA", "not a number"),
    ("{SCRAM-SHA-256}1000,c2FsdHNhbHRzYWx0,AAAA,AAAA", "between 4096"),
    ("{SCRAM-SHA-256}4096,c2FsdA==,AAAA,AAAA", "shorter than 12"),
    ("{SCRAM-SHA-256}4096,c2FsdHNhbHRzYWx0,AA!A,AAAA", "invalid base64"),
    ("{SCRAM-SHA-256}4096,c2FsdHNhbHRzYWx0,AAAA,AAAA", "32 octets"),
])
def test_parse_dovecot_scram_errors(value: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        sasl.parse_dovecot_scram(value)
    assert words in str(info.value) and "c2Fsd" not in str(info.value)


# ---------------------------------------------------------------- SASLprep (RFC 4013 3)

@pytest.mark.parametrize(("text", "prepared"), [
    ("I\u00adX", "IX"),          # 1: soft hyphen mapped to nothing
    ("user", "user"),            # 2
    ("USER", "USER"),            # 3: case preserved
    ("\u00aa", "a"),             # 4: NFKC
    ("\u2168", "IX"),            # 5: NFKC, matches #1
    ("a\u00a0b", "a b"),         # non-ASCII space mapped to SPACE
    ("\u0627\u0628", "\u0627\u0628"),  # right-to-left only is fine
])
def test_saslprep_rfc_4013_examples(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize(("text", "words"), [
    ("\u0007", "prohibited ASCII control character U+0007"),   # 6
    ("\u0627\u0031", "must start and end with right-to-left"),   # 7
    ("\u0627a\u0627", "mixes right-to-left and left-to-right"),
    ("a\ue000", "private use character"),
    ("a\u200e", "change-of-direction"),
])
def test_saslprep_refuses(text: str, words: str) -> None:
    with pytest.raises(sasl.SaslPrepError, match=re.escape(words)):
        saslprep(text)


def test_saslprep_unassigned_only_in_queries() -> None:
    unassigned = "a\u0221"  # unassigned in Unicode 3.2
    assert saslprep(unassigned) == unassigned
    with pytest.raises(sasl.SaslPrepError, match="unassigned"):
        saslprep(unassigned, allow_unassigned=False)
