"""Tests for tpops.config_syntax: the TPOPS ``$name = value`` reader alone, without the schema."""

from __future__ import annotations

import ast
import os
import syslog
from pathlib import Path

import pytest

from tpops import config_syntax
from tpops.config import Kind
from tpops.config_syntax import (
    Assignment,
    Facility,
    Malformed,
    literal,
    read_statements,
)


def test_every_construct_of_a_tpops_file() -> None:
    text = ("\ufeff#!/usr/bin/ruby\r\n"
            "$port = 110 # the port\r\n"
            "$connection_keep_time = 60*60\n"
            "$hostname = `uname -n`.chomp\n"
            "$syslog_facility = Syslog::LOG_MAIL\n"
            "$error_log = nil\n"
            "$with_inetd = false\n"
            "$mysql_auth_query = \"select * from user where login='%s'\"\n"
            "#def after_auth_hook(sock, auth, mailbox)\n"
            "#  sock.print \"+OK hello\\r\\n\"\n"
            "#end\n"
            "=begin\n"
            "$port = 'not read'\n"
            "=end\n"
            "__END__\n"
            "$port = 'not read either'\n")
    assert read_statements(text) == [
        Assignment(2, "port", 110),
        Assignment(3, "connection_keep_time", 3600),
        Assignment(4, "hostname", os.uname().nodename),
        Assignment(5, "syslog_facility", Facility("LOG_MAIL", syslog.LOG_MAIL)),
        Assignment(6, "error_log", None),
        Assignment(7, "with_inetd", False),
        Assignment(8, "mysql_auth_query", "select * from user where login='%s'"),
    ]


def test_the_reader_knows_no_schema() -> None:
    # Unknown names and wrong types are the schema's business: the reader reports values.
    assert read_statements("$nosuch = 'x'\n$port = true\n") == [
        Assignment(1, "nosuch", "x"), Assignment(2, "port", True)]


def test_problems_are_statements_with_their_line() -> None:
    assert read_statements("$a = 'open\n$b += 1\ndef x\n=begin\n") == [
        Assignment(1, "a", None, "$a: unterminated single-quoted string"),
        Malformed(2, "$b: expected '$b = value', got '$b += 1'", "b"),
        Malformed(3, "expected '$name = value' or a comment, got 'def x'"),
        Malformed(4, "=begin without =end"),
    ]


@pytest.mark.parametrize("value", [
    None, True, False, 0, -5, 3600, "", "plain", "it's", 'say "hi"', "tab\there",
    "line\nbreak", "#{not interpolated}", "back\\slash", "both ' and \" #{x}",
    Facility("LOG_LOCAL5", syslog.LOG_LOCAL5),
])
def test_literal_reads_back(value: config_syntax.Value) -> None:
    assert read_statements(f"$x = {literal(value)}\n") == [Assignment(1, "x", value)]


def test_kinds_are_an_enum_naming_what_they_accept() -> None:
    assert [k.name for k in Kind] == ["INT", "BOOL", "STR", "OPT_STR", "OPT_INT", "OPT_BOOL", "FACILITY"]
    assert Kind.OPT_INT.accepts(None) and Kind.OPT_INT.accepts(995) and not Kind.OPT_INT.accepts(True)
    assert Kind.OPT_BOOL.accepts(None) and Kind.OPT_BOOL.accepts(False) and not Kind.OPT_BOOL.accepts(0)
    assert Kind.INT.accepts(5) and not Kind.INT.accepts(True) and not Kind.INT.accepts("5")
    assert Kind.BOOL.accepts(False) and not Kind.BOOL.accepts(0)
    assert Kind.STR.accepts("") and not Kind.STR.accepts(None)
    assert Kind.OPT_STR.accepts(None) and Kind.OPT_STR.accepts("x")
    assert Kind.FACILITY.accepts(None) and Kind.FACILITY.accepts(syslog.LOG_MAIL)
    assert not Kind.FACILITY.accepts("mail")


def test_the_reader_does_not_import_the_schema() -> None:
    source = Path(config_syntax.__file__).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m and m.startswith("tpops")}
