r"""The tpops.conf reader: the TPOPS (Ruby) ``$name = value`` syntax, without running Ruby.

The file is a list of ``$name = value`` lines, exactly as the 2003 TPOPS read it
with ``load``; the original ``tpops.conf.sample`` (its commented-out Ruby hook
block included) loads unchanged.  Instead of evaluating Ruby, a small tokenizer
accepts only this grammar::

    line      := blank | comment | assignment [comment]
    comment   := '#' anything                      (also =begin ... =end blocks,
                                                    and __END__ ends the file)
    assignment:= '$' NAME '=' value
    value     := intexpr                           60*60, 2*60+30, -1, 1_000
               | 'single quoted'                   only \\ and \' are escapes
               | "double quoted"                   \\ \" \n \t \# escapes; #{...} is an error
               | true | false | nil
               | Syslog::LOG_MAIL                  and the other facility names
               | `uname -n`.chomp                  this host's name; no other command

Integer expressions use ``+``, ``-`` and ``*`` with normal precedence (no
parentheses, no division); a leading zero (Ruby octal) is refused rather than
guessed.

This module knows the syntax only: :func:`read_statements` turns text into
:class:`Assignment` and :class:`Malformed` statements in file order, and
:func:`literal` writes a value back in the same syntax.  Which names exist,
what type each must have and what values are allowed is the schema's business
(:mod:`tpops.config`), which also turns line numbers into ``FILE:LINE:`` messages.
"""

from __future__ import annotations

import os
import re
import syslog
from dataclasses import dataclass

__all__ = [
    "SYSLOG_FACILITIES",
    "Assignment",
    "Facility",
    "Malformed",
    "Statement",
    "Value",
    "literal",
    "nodename",
    "read_statements",
]

_FACILITY_NAMES = (
    "LOG_KERN", "LOG_USER", "LOG_MAIL", "LOG_DAEMON", "LOG_AUTH", "LOG_LPR",
    "LOG_NEWS", "LOG_UUCP", "LOG_CRON", "LOG_AUTHPRIV",
    "LOG_LOCAL0", "LOG_LOCAL1", "LOG_LOCAL2", "LOG_LOCAL3",
    "LOG_LOCAL4", "LOG_LOCAL5", "LOG_LOCAL6", "LOG_LOCAL7",
)
#: ``Syslog::LOG_*`` facility name -> the stdlib :mod:`syslog` constant.
SYSLOG_FACILITIES: dict[str, int] = {
    name: getattr(syslog, name) for name in _FACILITY_NAMES if hasattr(syslog, name)
}
# Ruby's Syslog names that exist but are not facilities: named in error messages.
_NOT_FACILITIES = frozenset({
    "LOG_EMERG", "LOG_ALERT", "LOG_CRIT", "LOG_ERR", "LOG_WARNING", "LOG_NOTICE",
    "LOG_INFO", "LOG_DEBUG", "LOG_PID", "LOG_CONS", "LOG_ODELAY", "LOG_NDELAY",
    "LOG_NOWAIT", "LOG_PERROR",
})


def nodename() -> str:
    """This host's name, the value of ```uname -n`.chomp``."""
    return os.uname().nodename


@dataclass(frozen=True)
class Facility:
    """A ``Syslog::LOG_*`` constant as written (an int for the config, a name for errors)."""

    name: str
    value: int


#: A value as written in the file: Ruby's nil, true/false, an integer, a string, a facility.
Value = None | bool | int | str | Facility


@dataclass(frozen=True)
class Assignment:
    """``$name = value`` at ``line``; ``error`` (then ``value`` is None) when the value
    could not be read, e.g. ``"$port: unterminated single-quoted string"``."""

    line: int
    name: str
    value: Value
    error: str | None = None


@dataclass(frozen=True)
class Malformed:
    """A line that is neither blank, a comment nor an assignment; ``name`` is the
    ``$name`` it starts with, if any (that parameter is then considered broken)."""

    line: int
    message: str
    name: str | None = None


Statement = Assignment | Malformed


class _ParseError(Exception):
    pass


_SPACE = " \t\f\v"  # Ruby's blanks within a line
_ASSIGN = re.compile(r"[ \t\f\v]*\$([A-Za-z_][A-Za-z0-9_]*)[ \t\f\v]*=(?![=~>])")
_NAME_ONLY = re.compile(r"[ \t\f\v]*\$([A-Za-z_][A-Za-z0-9_]*)")
_INT_TOKEN = re.compile(r"[0-9]+(?:_[0-9]+)*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*[?!]?")
_SYSLOG = re.compile(r"Syslog::([A-Za-z_][A-Za-z0-9_]*)")
_BACKTICK = re.compile(r"`[ \t]*uname[ \t]+-n[ \t]*`\.chomp(?![A-Za-z0-9_!?(])")
_DQ_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "#": "#"}


class _Scanner:
    """Parses the value part of one assignment line."""

    def __init__(self, text: str, pos: int = 0) -> None:
        self.text = text
        self.pos = pos

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def rest(self) -> str:
        return self.text[self.pos:]

    def value(self) -> Value:
        self.skip_space()
        ch = self.peek()
        if ch == "":
            raise _ParseError("missing value after '='")
        if ch == "'":
            return self.single_quoted()
        if ch == '"':
            return self.double_quoted()
        if ch == "`":
            m = _BACKTICK.match(self.text, self.pos)
            if not m:
                raise _ParseError("the only command allowed in backticks is `uname -n`.chomp")
            self.pos = m.end()
            return nodename()
        if ch in "0123456789+-":
            return self.int_expr()
        m = _SYSLOG.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return self.facility(m.group(1))
        m = _WORD.match(self.text, self.pos)
        if m and m.group() in ("true", "false", "nil"):
            self.pos = m.end()
            return {"true": True, "false": False, "nil": None}[m.group()]
        shown = m.group() if m else (self.rest().split() or [self.rest()])[0]
        raise _ParseError(f"unsupported value {shown!r} (expected a number, a quoted "
                          f"string, true, false, nil or Syslog::LOG_*)")

    @staticmethod
    def facility(name: str) -> Facility:
        if name in SYSLOG_FACILITIES:
            return Facility(name, SYSLOG_FACILITIES[name])
        if name in _NOT_FACILITIES:
            raise _ParseError(f"Syslog::{name} is not a syslog facility "
                              f"(use e.g. Syslog::LOG_MAIL)")
        raise _ParseError(f"unknown syslog facility Syslog::{name}")

    def single_quoted(self) -> str:
        # Ruby: only \\ and \' are escapes; any other backslash stays as written.
        out: list[str] = []
        i = self.pos + 1
        text = self.text
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "\\'":
                out.append(text[i + 1])
                i += 2
            elif ch == "'":
                self.pos = i + 1
                return "".join(out)
            else:
                out.append(ch)
                i += 1
        raise _ParseError("unterminated single-quoted string")

    def double_quoted(self) -> str:
        out: list[str] = []
        i = self.pos + 1
        text = self.text
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                esc = text[i + 1] if i + 1 < len(text) else ""
                if esc not in _DQ_ESCAPES:
                    shown = f"\\{esc}" if esc else "\\ at end of line"
                    raise _ParseError(f"unsupported escape {shown} in double-quoted string "
                                      f"(only \\\\ \\\" \\n \\t \\#; or use single quotes)")
                out.append(_DQ_ESCAPES[esc])
                i += 2
            elif ch == "#" and i + 1 < len(text) and text[i + 1] in "{$@":
                raise _ParseError(f"interpolation #{text[i + 1]}... in a double-quoted string "
                                  f"is not supported (write \\# or use single quotes)")
            elif ch == '"':
                self.pos = i + 1
                return "".join(out)
            else:
                out.append(ch)
                i += 1
        raise _ParseError("unterminated double-quoted string")

    def int_operand(self) -> int:
        self.skip_space()
        sign = 1
        while self.peek() in ("+", "-"):
            if self.peek() == "-":
                sign = -sign
            self.pos += 1
            self.skip_space()
        m = _INT_TOKEN.match(self.text, self.pos)
        if not m:
            raise _ParseError("expected an integer" + (
                f" at {self.rest()!r}" if self.rest().strip() else " at end of line"))
        digits = m.group()
        after = self.text[m.end():m.end() + 2]
        if re.match(r"[.eE][0-9]", after):
            raise _ParseError("floating-point numbers are not supported")
        if re.match(r"[A-Za-z_]", after):
            raise _ParseError(f"bad integer {self.text[self.pos:m.end() + 1]!r}...")
        if len(digits) > 1 and digits[0] == "0":
            raise _ParseError(f"integer {digits} has a leading zero (Ruby reads that as "
                              f"octal); write it without the leading zero")
        self.pos = m.end()
        return sign * int(digits.replace("_", ""))

    def int_term(self) -> int:
        value = self.int_operand()
        while True:
            save = self.pos
            self.skip_space()
            if self.peek() == "*" and self.text[self.pos:self.pos + 2] != "**":
                self.pos += 1
                value *= self.int_operand()
            else:
                self.pos = save
                return value

    def int_expr(self) -> int:
        value = self.int_term()
        while True:
            save = self.pos
            self.skip_space()
            op = self.peek()
            if op in ("+", "-"):
                self.pos += 1
                rhs = self.int_term()
                value = value + rhs if op == "+" else value - rhs
            else:
                self.pos = save
                return value

    def end(self) -> None:
        """Only blanks and a comment may follow the value."""
        self.skip_space()
        rest = self.rest()
        if rest and not rest.startswith("#"):
            raise _ParseError(f"unexpected {rest.rstrip()!r} after the value "
                              f"(only '$name = value' and comments are allowed)")


def read_statements(text: str) -> list[Statement]:
    """Every assignment and every malformed line of ``text``, in file order.

    Comments, blank lines, ``=begin``/``=end`` blocks and everything after
    ``__END__`` are skipped; a leading byte-order mark and CRLF line ends are
    accepted.  An ``=begin`` without ``=end`` is reported, last, at its line.
    """
    statements: list[Statement] = []
    in_doc = 0  # line number of an open =begin block
    text = text.removeprefix("\ufeff")
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if in_doc:
            if re.match(r"=end(\s|$)", line):
                in_doc = 0
            continue
        if re.match(r"=begin(\s|$)", line):
            in_doc = lineno
            continue
        if line.rstrip(_SPACE) == "__END__":
            break  # Ruby ignores the rest of the file
        stripped = line.strip(_SPACE)
        if not stripped or stripped.startswith("#"):
            continue
        m = _ASSIGN.match(line)
        if not m:
            nm = _NAME_ONLY.match(line)
            if nm:
                name = nm.group(1)
                statements.append(Malformed(
                    lineno, f"${name}: expected '${name} = value', got {stripped!r}", name))
            else:
                statements.append(Malformed(
                    lineno, f"expected '$name = value' or a comment, got {stripped!r}"))
            continue
        name = m.group(1)
        scanner = _Scanner(line, m.end())
        try:
            value = scanner.value()
            scanner.end()
        except _ParseError as exc:
            statements.append(Assignment(lineno, name, None, f"${name}: {exc}"))
            continue
        statements.append(Assignment(lineno, name, value))
    if in_doc:
        statements.append(Malformed(in_doc, "=begin without =end"))
    return statements


def quote(value: str) -> str:
    """``value`` as a string literal of the file (single quotes unless awkward)."""
    if "\n" in value or "\t" in value or ("'" in value and '"' not in value):
        body = (value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
                .replace("\n", "\\n").replace("\t", "\\t"))
        return f'"{body}"'
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def literal(value: Value) -> str:
    """``value`` written in the file's syntax; :func:`read_statements` reads it back."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Facility):
        return f"Syslog::{value.name}"
    if isinstance(value, int):
        return str(value)
    return quote(value)
