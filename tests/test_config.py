"""Tests for tpops.config: the tpops.conf grammar, validation and format_effective."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import syslog
from pathlib import Path

import pytest

from tpops import config as config_mod
from tpops.config import (
    DEFAULT_PATH,
    PARAMETER_DOCS,
    Config,
    ConfigError,
    check_config,
    format_effective,
    load_config,
    parse_config,
)

#: A tpops.conf written as TPOPS 0.5.1's sample writes it (our own fixture, in the repository).
SAMPLE = Path(__file__).resolve().parent / "data" / "tpops.conf.tpops051"
#: Every parameter TPOPS 0.5.1 knew (its README), each set in its sample tpops.conf.
TPOPS051_PARAMETERS = (
    "port", "hostname", "connection_keep_time", "command_timeout", "with_inetd", "access_log",
    "error_log", "pid_file", "syslog_facility", "auth_type", "error_interval", "min_servers",
    "max_servers", "max_use", "max_idle", "maildir_extended", "maildir_use_filesize",
    "passwd_lock_dir", "apop_passwd_file", "mysql_server", "mysql_user", "mysql_pass", "mysql_db",
    "mysql_auth_query",
)
NODENAME = os.uname().nodename


def parse_one(line: str) -> Config:
    return parse_config(line + "\n", "t.conf")


def errors_of(text: str, filename: str = "t.conf") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# ---------------------------------------------------------------- the original sample

def test_original_sample_loads_unchanged() -> None:
    assert SAMPLE.is_file(), f"seed sample missing at {SAMPLE}"
    c = load_config(str(SAMPLE))
    assert c.port == 110
    assert c.hostname == NODENAME
    assert c.connection_keep_time == 3600
    assert c.command_timeout == 600
    assert c.with_inetd is False
    assert c.access_log is None and c.error_log is None and c.pid_file is None
    assert c.syslog_facility == syslog.LOG_MAIL
    assert c.auth_type == "Passwd"
    assert (c.error_interval, c.min_servers, c.max_servers, c.max_use, c.max_idle) == (
        5, 5, 50, 100, 100)
    assert c.maildir_extended is True and c.maildir_use_filesize is True
    assert c.passwd_lock_dir == "/var/tmp/tpops"
    assert c.apop_passwd_file is None
    assert (c.mysql_server, c.mysql_user, c.mysql_pass, c.mysql_db) == (None,) * 4
    assert c.mysql_auth_query == "select login,passwd,uid,maildir from user where login='%s'"
    assert check_config(c) == []


def test_original_sample_fixture_has_every_parameter_and_construct() -> None:
    """The fixture sets each 0.5.1 parameter once and uses every construct the 0.5.1 sample does."""
    text = SAMPLE.read_text()
    assigned = re.findall(r"^\$([a-z_]+) = ", text, flags=re.M)
    assert sorted(assigned) == sorted(TPOPS051_PARAMETERS)
    assert "$hostname = `uname -n`.chomp\n" in text
    assert "$connection_keep_time = 60*60" in text and "$command_timeout = 10*60\n" in text
    assert "$syslog_facility = Syslog::LOG_MAIL\n" in text
    assert re.search(r"^\$[a-z_]+ = nil\t+# '", text, flags=re.M)  # nil, a tab, a commented-out value
    assert "= true\n" in text and "= false\n" in text
    assert "$auth_type = 'Passwd'\n" in text
    assert "login='%s'\"\n" in text  # a double-quoted string holding single quotes
    hook = [line for line in text.splitlines() if line.startswith("#") and "#{" in line]
    assert hook and text.rstrip().endswith("#end")  # the commented Ruby hook, interpolation and all


# ---------------------------------------------------------------- defaults and files

def test_defaults() -> None:
    c = Config()
    assert c.port == 110 and c.hostname == NODENAME
    assert c.syslog_facility == syslog.LOG_MAIL
    assert c.maildir_extended is False and c.maildir_use_filesize is False
    assert c.mysql_auth_query == 'select login,passwd,uid,maildir from user where login="%s"'
    assert (c.max_bad_commands, c.max_auth_failures, c.mysql_port) == (10, 3, 3306)
    assert c.bind_address is None and c.bind_addresses() == []
    assert c.debug is False and c.user is None and c.group is None
    assert check_config(c) == []
    assert parse_config("") == c
    assert DEFAULT_PATH == "/etc/tpops/tpops.conf"


def test_missing_default_file_means_defaults(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent.conf"))
    assert load_config(None) == Config()


def test_default_file_is_read_when_present(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tpops.conf"
    path.write_text("$port = 1110\n")
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(path))
    assert load_config(None).port == 1110


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.conf")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"
    assert info.value.errors == [f"{path}: no such file"]


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))  # a directory
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("# ok\n$port = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [
        f"{path}:2: $port: expected an integer, got the string 'x'"]


def test_non_utf8_bytes_allowed_in_comments_not_values(tmp_path: Path) -> None:
    path = tmp_path / "euc.conf"
    path.write_bytes(b"# \xa5\xdd\xa1\xbc\xa5\xc8\n$port = 995 # \xc8\xd6\xb9\xe6\n")
    assert load_config(str(path)).port == 995
    path.write_bytes(b"$error_log = '/var/log/\xff'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [f"{path}:1: $error_log: not valid UTF-8 text"]


# ---------------------------------------------------------------- value forms

@pytest.mark.parametrize(("expr", "value"), [
    ("110", 110), ("0", 0), ("60*60", 3600), ("10*60", 600), ("5+1", 6),
    ("2*60+30", 150), ("2 + 3 * 4", 14), ("30+2*60", 150), ("10 - 3 - 2", 5),
    ("10 - -5", 15), ("-2*-3", 6), ("1_000", 1000), ("2*3*4", 24),
])
def test_integer_expressions(expr: str, value: int) -> None:
    assert parse_one(f"$port = {expr}").port == value


@pytest.mark.parametrize(("literal", "value"), [
    (r"'plain'", "plain"),
    (r"'a\\b'", "a\\b"),
    (r"'it\'s'", "it's"),
    (r"'a\nb'", "a\\nb"),           # Ruby: no other escapes in single quotes
    (r"'C:\dir'", "C:\\dir"),
    (r"'#{x}'", "#{x}"),            # no interpolation in single quotes
    (r"'a#b'", "a#b"),
    (r"'say \"hi\"'", 'say \\"hi\\"'),
    (r'"plain"', "plain"),
    (r'"a\\b"', "a\\b"),
    (r'"say \"hi\""', 'say "hi"'),
    (r'"a\nb\tc"', "a\nb\tc"),
    (r'"a\#{b}"', "a#{b}"),
    (r'"x#y # z"', "x#y # z"),
    (r'"it' + "'" + r's"', "it's"),
    (r"''", ""),
])
def test_string_literals(literal: str, value: str) -> None:
    assert parse_one(f"$mysql_pass = {literal}").mysql_pass == value


def test_hash_inside_strings_is_not_a_comment() -> None:
    c = parse_config("$error_log = '/var/log/#tpops' # the error log\n"
                     '$access_log = "/var/log/a#b"#comment\n'
                     "$mysql_pass = 'x' # 'y'\n")
    assert c.error_log == "/var/log/#tpops"
    assert c.access_log == "/var/log/a#b"
    assert c.mysql_pass == "x"


def test_booleans_and_nil() -> None:
    c = parse_config("$with_inetd = true\n$debug = true\n$maildir_extended = false\n"
                     "$error_log = nil\n$syslog_facility = nil\n")
    assert c.with_inetd is True and c.debug is True and c.maildir_extended is False
    assert c.error_log is None
    assert c.syslog_facility is None


@pytest.mark.parametrize("name", [
    "LOG_KERN", "LOG_USER", "LOG_MAIL", "LOG_DAEMON", "LOG_AUTH", "LOG_LPR", "LOG_NEWS",
    "LOG_UUCP", "LOG_CRON", "LOG_AUTHPRIV", *(f"LOG_LOCAL{i}" for i in range(8)),
])
def test_syslog_facilities(name: str) -> None:
    assert parse_one(f"$syslog_facility = Syslog::{name}").syslog_facility == getattr(
        syslog, name)


def test_syslog_facility_as_integer() -> None:
    assert parse_one(f"$syslog_facility = {syslog.LOG_LOCAL3}").syslog_facility == \
        syslog.LOG_LOCAL3


def test_uname_hostname() -> None:
    assert parse_one("$hostname = `uname -n`.chomp").hostname == NODENAME
    assert parse_one("$hostname = `uname  -n`.chomp  # this host").hostname == NODENAME
    assert parse_one("$default_domain = `uname -n`.chomp").default_domain == NODENAME
    assert parse_one("$hostname = 'pop.example.org'").hostname == "pop.example.org"


def test_layout_comments_and_ruby_markers() -> None:
    text = ("\ufeff#!/usr/bin/ruby\r\n"
            "  # indented comment\r\n"
            "\r\n"
            "   $port=995   \r\n"
            "=begin\r\n"
            "$port = 'not parsed'\r\n"
            "=end\r\n"
            "\t$max_use\t=\t0\r\n"
            "__END__\r\n"
            "anything at all\r\n")
    c = parse_config(text)
    assert c.port == 995
    assert c.max_use == 0


def test_duplicate_assignment_last_wins() -> None:
    c = parse_config("$port = 1\n$port = 2\n$port = 3\n")
    assert c.port == 3


def test_new_parameters() -> None:
    c = parse_config("$bind_address = '127.0.0.1, ::1  192.0.2.1'\n"
                     "$auth_type = 'File'\n$auth_file = '/etc/tpops/users'\n"
                     "$max_bad_commands = 5\n$max_auth_failures = 1\n"
                     "$mysql_port = 3307\n$mysql_socket = '/run/mysqld/mysqld.sock'\n"
                     "$default_domain = 'example.org'\n$user = 'mail'\n$group = '8'\n"
                     "$debug = true\n")
    assert c.bind_addresses() == ["127.0.0.1", "::1", "192.0.2.1"]
    assert (c.auth_type, c.auth_file) == ("File", "/etc/tpops/users")
    assert (c.max_bad_commands, c.max_auth_failures, c.mysql_port) == (5, 1, 3307)
    assert c.mysql_socket == "/run/mysqld/mysqld.sock"
    assert (c.default_domain, c.user, c.group, c.debug) == ("example.org", "mail", "8", True)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(("line", "message"), [
    # unknown parameter
    ("$prot = 110", "unknown parameter $prot (did you mean $port?)"),
    ("$MailboxType = 'Maildir'", "unknown parameter $MailboxType"),
    # wrong type
    ("$port = true", "$port: expected an integer, got true"),
    ("$port = '110'", "$port: expected an integer, got the string '110' "
                      "(write 110 without quotes)"),
    ("$port = nil", "$port: expected an integer, got nil"),
    ("$with_inetd = 1", "$with_inetd: expected true or false, got the integer 1"),
    ("$with_inetd = 'true'", "$with_inetd: expected true or false, got the string 'true' "
                             "(write true without quotes)"),
    ("$hostname = nil", "$hostname: expected a string, got nil"),
    ("$error_log = 5", "$error_log: expected a string or nil, got the integer 5"),
    ("$user = 1000", "$user: expected a string or nil, got the integer 1000 "
                     "(write a numeric id as a string: '1000')"),
    ("$port = Syslog::LOG_MAIL", "$port: expected an integer, got Syslog::LOG_MAIL"),
    ("$syslog_facility = 'mail'", "$syslog_facility: expected a syslog facility "
                                  "(Syslog::LOG_MAIL, ...) or nil, got the string 'mail'"),
    # bad values
    ("$port = 65536", "$port must be between 0 and 65535, got 65536"),
    ("$port = -1", "$port must be between 0 and 65535, got -1"),
    ("$mysql_port = 0", "$mysql_port must be between 1 and 65535, got 0"),
    ("$min_servers = 0", "$min_servers must be at least 1, got 0"),
    ("$min_servers = 51", "$max_servers (50) must be at least $min_servers (51)"),
    ("$command_timeout = 0", "$command_timeout must be at least 1, got 0"),
    ("$connection_keep_time = 0", "$connection_keep_time must be at least 1, got 0"),
    ("$error_interval = -1", "$error_interval must be at least 0, got -1"),
    ("$max_use = -1", "$max_use must be at least 0 (0 = no limit), got -1"),
    ("$max_idle = 0", "$max_idle must be at least 1, got 0"),
    ("$max_bad_commands = 0", "$max_bad_commands must be at least 1, got 0"),
    ("$max_auth_failures = 0", "$max_auth_failures must be at least 1, got 0"),
    ("$syslog_facility = 99", "$syslog_facility: 99 is not a known syslog facility "
                              "(use Syslog::LOG_MAIL, Syslog::LOG_LOCAL0 ... or nil)"),
    ("$auth_type = 'mysql'", "$auth_type must be one of 'Passwd', 'MySQL', 'File', "
                             "got 'mysql'; did you mean 'MySQL'? (case matters)"),
    ("$auth_type = 'LDAP'", "$auth_type must be one of 'Passwd', 'MySQL', 'File', got 'LDAP'"),
    ("$auth_type = 'File'", "$auth_type 'File' requires $auth_file"),
    ("$pid_file = ''", "$pid_file: must not be empty (use nil to leave it unset)"),
    ("$hostname = ''", "$hostname: must not be empty"),
    ("$bind_address = ' , '", "$bind_address: no address given (use nil for all addresses)"),
    ("$mysql_pass = \"a\\x01\"", "$mysql_pass: unsupported escape \\x in double-quoted string "
                                 "(only \\\\ \\\" \\n \\t \\#; or use single quotes)"),
    ("$error_log = 'a\x01b'", "$error_log: contains control characters"),
    # constructs outside the grammar
    ("$port = 1 if x", "$port: unexpected 'if x' after the value "
                       "(only '$name = value' and comments are allowed)"),
    ("$port = 110;", "$port: unexpected ';' after the value "
                     "(only '$name = value' and comments are allowed)"),
    ("$port = 2**3", "$port: unexpected '**3' after the value "
                     "(only '$name = value' and comments are allowed)"),
    ("def foo", "expected '$name = value' or a comment, got 'def foo'"),
    ("port = 110", "expected '$name = value' or a comment, got 'port = 110'"),
    ("$port += 1", "$port: expected '$port = value', got '$port += 1'"),
    ("$port == 1", "$port: expected '$port = value', got '$port == 1'"),
    ("$port =", "$port: missing value after '='"),
    ("$port = (1)", "$port: unsupported value '(1)' (expected a number, a quoted string, "
                    "true, false, nil or Syslog::LOG_*)"),
    ("$port = $max_use", "$port: unsupported value '$max_use' (expected a number, a quoted "
                         "string, true, false, nil or Syslog::LOG_*)"),
    ("$port = ENV['PORT']", "$port: unsupported value 'ENV' (expected a number, a quoted "
                            "string, true, false, nil or Syslog::LOG_*)"),
    ("$port = 60 *", "$port: expected an integer at end of line"),
    ("$port = 1.5", "$port: floating-point numbers are not supported"),
    ("$port = 0110", "$port: integer 0110 has a leading zero (Ruby reads that as octal); "
                     "write it without the leading zero"),
    ("$port = 0x6e", "$port: bad integer '0x'..."),
    ("$hostname = `hostname`", "$hostname: the only command allowed in backticks is "
                               "`uname -n`.chomp"),
    ("$hostname = `uname -n`", "$hostname: the only command allowed in backticks is "
                               "`uname -n`.chomp"),
    ("$error_log = \"/var/log/#{x}\"", "$error_log: interpolation #{... in a double-quoted "
                                       "string is not supported (write \\# or use single quotes)"),
    ("$error_log = \"#$0\"", "$error_log: interpolation #$... in a double-quoted "
                             "string is not supported (write \\# or use single quotes)"),
    ("$error_log = '/var/log", "$error_log: unterminated single-quoted string"),
    ("$error_log = \"/var/log", "$error_log: unterminated double-quoted string"),
    ("$error_log = 'a' 'b'", "$error_log: unexpected \"'b'\" after the value "
                             "(only '$name = value' and comments are allowed)"),
    ("$syslog_facility = Syslog::LOG_ERR", "$syslog_facility: Syslog::LOG_ERR is not a syslog "
                                           "facility (use e.g. Syslog::LOG_MAIL)"),
    ("$syslog_facility = Syslog::LOG_MAILER", "$syslog_facility: unknown syslog facility "
                                              "Syslog::LOG_MAILER"),
    ("$with_inetd = yes", "$with_inetd: unsupported value 'yes' (expected a number, a quoted "
                          "string, true, false, nil or Syslog::LOG_*)"),
])
def test_error_messages(line: str, message: str) -> None:
    assert errors_of(f"# line 1\n{line}\n# line 3\n") == [f"t.conf:2: {message}"]


def test_unterminated_begin_block() -> None:
    assert errors_of("$port = 1\n=begin\n$port = 2\n") == ["t.conf:2: =begin without =end"]


def test_all_errors_are_collected_in_line_order() -> None:
    text = ("$port = 'x'\n"          # 1 type
            "$max_servers = 2\n"      # 2 fine by itself
            "$bogus = 1\n"            # 3 unknown
            "$min_servers = 3\n"      # 4 max < min, reported at the later line
            "# fine\n"
            "$hostname = `ls`\n"      # 6 construct
            "$auth_type = 'passwd'\n"  # 7 bad value
            )
    errs = errors_of(text, "multi.conf")
    assert [e.split(": ", 1)[0] for e in errs] == [
        "multi.conf:1", "multi.conf:3", "multi.conf:4", "multi.conf:6", "multi.conf:7"]
    assert errs[2] == "multi.conf:4: $max_servers (2) must be at least $min_servers (3)"


def test_a_broken_line_is_not_blamed_twice() -> None:
    # $min_servers failed to parse, so its default must not produce a second error.
    assert errors_of("$max_servers = 3\n$min_servers = 'many'\n") == [
        "t.conf:2: $min_servers: expected an integer, got the string 'many'"]


def test_config_error_api() -> None:
    err = ConfigError(["a:1: x", "a:2: y"])
    assert err.errors == ["a:1: x", "a:2: y"]
    assert str(err) == "a:1: x\na:2: y"
    assert ConfigError("p: no such file").errors == ["p: no such file"]
    assert pickle.loads(pickle.dumps(err)).errors == err.errors


# ---------------------------------------------------------------- check_config / overrides

def test_check_config_after_command_line_overrides() -> None:
    base = Config()
    assert check_config(dataclasses.replace(base, port=995, debug=True)) == []
    assert check_config(dataclasses.replace(base, port=70000)) == [
        "$port must be between 0 and 65535, got 70000"]
    assert check_config(dataclasses.replace(base, port="110")) == [  # type: ignore[arg-type]
        "$port: expected an integer, got the string '110' (write 110 without quotes)"]
    assert check_config(dataclasses.replace(base, debug=1)) == [  # type: ignore[arg-type]
        "$debug: expected true or false, got the integer 1"]
    assert check_config(dataclasses.replace(base, min_servers=9, max_servers=8)) == [
        "$max_servers (8) must be at least $min_servers (9)"]
    assert check_config(dataclasses.replace(base, user="")) == [
        "$user: must not be empty (use nil to leave it unset)"]


def test_validate_raises_with_all_problems() -> None:
    bad = dataclasses.replace(Config(), port=-5, max_idle=0)
    with pytest.raises(ConfigError) as info:
        bad.validate()
    assert info.value.errors == ["$port must be between 0 and 65535, got -5",
                                 "$max_idle must be at least 1, got 0"]
    Config().validate()  # must not raise


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


def test_parameter_docs_cover_every_field() -> None:
    names = [f.name for f in dataclasses.fields(Config)]
    assert list(PARAMETER_DOCS) == names
    for name, doc in PARAMETER_DOCS.items():
        assert doc and "\n" not in doc, name


# ---------------------------------------------------------------- format_effective

def test_format_effective_shape() -> None:
    out = format_effective(Config())
    lines = out.splitlines()
    assert out.endswith("\n")
    assert all(re.fullmatch(r"\$\w+ = \S.*", line) for line in lines)
    assert [line.split(" = ", 1)[0] for line in lines] == [
        f"${f.name}" for f in dataclasses.fields(Config)]
    assert lines[0] == "$port = 110"
    assert "$syslog_facility = Syslog::LOG_MAIL" in lines
    assert "$mysql_pass = nil" in lines
    assert "$with_inetd = false" in lines


def test_format_effective_round_trips() -> None:
    tricky = Config(
        port=995, bind_address="::1, 127.0.0.1", hostname="pop.example.org",
        with_inetd=True, syslog_facility=None, error_log="/var/log/it's #{here}\\",
        access_log='/var/log/"quoted"', pid_file="tab\tand\nnewline \"#{x}\" 'q' \\",
        auth_type="File", auth_file="/etc/tpops/users", min_servers=1, max_servers=1,
        max_use=0, user="1000", group="mail", default_domain="example.org", debug=True,
        mysql_auth_query="select * from u where login='%s'",
    )
    assert check_config(tricky) == []
    assert parse_config(format_effective(tricky), "effective") == tricky
    sample = load_config(str(SAMPLE))
    assert parse_config(format_effective(sample)) == sample
    local = dataclasses.replace(Config(), syslog_facility=syslog.LOG_LOCAL5)
    assert "$syslog_facility = Syslog::LOG_LOCAL5\n" in format_effective(local)


def test_format_effective_masks_mysql_pass() -> None:
    c = dataclasses.replace(Config(), auth_type="MySQL", mysql_pass="s3cr3t!")
    out = format_effective(c)
    assert "s3cr3t" not in out
    assert "$mysql_pass = '********'\n" in out
    assert parse_config(out) == dataclasses.replace(c, mysql_pass="********")


# ---------------------------------------------------------------- read_config_file / blame

def test_read_config_file_keeps_lines_for_later_blame(tmp_path: Path) -> None:
    path = tmp_path / "t.conf"
    path.write_text("# x\n$group = 'mail'\n$port = 1\n$port = 2\n")
    source = config_mod.read_config_file(str(path))  # $group alone: --user may still come
    assert source.config.group == "mail" and source.lines == {"group": 2, "port": 4}
    problems = config_mod.config_problems(source.config)
    assert problems == [(("user", "group"), "$group requires $user (the workers run as $user, in $group)")]
    names, message = problems[0]
    assert source.blame(names, message) == f"{path}:2: {message}"
    assert source.blame(names, message, overridden={"group"}) == f"command line: {message}"
    assert source.blame(("error_log",), "m") == f"{path}: m"
    assert check_config(dataclasses.replace(source.config, user="mail")) == []


def test_mysql_query_needs_its_placeholder() -> None:
    assert errors_of("$auth_type = 'MySQL'\n$mysql_auth_query = 'select 1'\n") == [
        "t.conf:2: $mysql_auth_query has no %s where the login name goes"]
    assert parse_config("$mysql_auth_query = 'select 1'\n").mysql_auth_query == "select 1"  # unused
