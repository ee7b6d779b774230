"""The man pages in man/: lint-clean, installed with the package, and telling the code's story.

Each page is checked by ``mandoc -T lint`` and ``groff -mdoc -ww -z`` (both from
scripts/test's Debian packages), rendered with mandoc, and compared with the real
program: every option the installed command's ``--help`` prints (subcommands
included) must appear in its page, and every parameter of tpops.conf.sample must
appear in tpops.conf(5) with its default. tpops.conf(5)'s parameter list must be
what scripts/gen-man-conf makes of the schema in tpops.config.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest

from tests.support.server import REPO
from tpops.config import Config, format_effective, parse_config

MAN = REPO / "man"
BIN = Path(sys.executable).parent
#: page -> the installed command whose --help it documents (None: a file format).
PAGES: dict[str, str | None] = {
    "tpops.8": "tpops",
    "tpops.conf.5": None,
    "tpops-passwd.8": "tpops-passwd",
    "tpops-apoppasswd.8": "tpops-apoppasswd",
}
#: Lint messages about this host, not the page: a cross-referenced page (inetd.conf(5),
#: doveadm-pw(1), ...) that is not installed here, or mandoc's stale man database.
HOST_DEPENDENT = re.compile(r"referenced manual not found|outdated mandoc\.db")
#: An option as --help writes it: -f, --check-config, --login-column.
OPTION = re.compile(r"(?<![\w$-])(--?[A-Za-z][\w-]*)")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs it: apt-get install "
                    f"{'mandoc' if name == 'mandoc' else 'groff-base'})")
    return path


@cache
def rendered(page: str) -> str:
    """The page as mandoc formats it for a terminal, without bold/underline overstrikes, lines unwrapped."""
    out = subprocess.run([_tool("mandoc"), "-T", "ascii", "-O", "width=400", str(MAN / page)],
                         capture_output=True, text=True, check=True).stdout
    return re.sub(r".\x08", "", out)


def mentions(text: str, word: str) -> bool:
    """``word`` appears in ``text`` as a whole word (``--user`` does not count for ``--use``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def help_text(*argv: str) -> str:
    out = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def options_of(help_output: str) -> set[str]:
    return set(OPTION.findall(help_output))


def test_the_package_ships_every_page() -> None:
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)
    pyproject = (REPO / "pyproject.toml").read_text()
    for page in PAGES:
        section = page.rsplit(".", 1)[1]
        assert re.search(rf'"share/man/man{section}" = \[[^\]]*"man/{re.escape(page)}"', pyproject), page


@pytest.mark.parametrize("page", sorted(PAGES))
def test_mandoc_lint_is_clean(page: str) -> None:
    out = subprocess.run([_tool("mandoc"), "-T", "lint", "-W", "style", str(MAN / page)],
                         check=False, capture_output=True, text=True)
    messages = [line for line in (out.stdout + out.stderr).splitlines() if not HOST_DEPENDENT.search(line)]
    assert messages == []


@pytest.mark.parametrize("page", sorted(PAGES))
def test_groff_has_no_warnings(page: str) -> None:
    out = subprocess.run([_tool("groff"), "-mdoc", "-ww", "-z", str(MAN / page)],
                         check=False, capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (0, "")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_name_section_names_the_page(page: str) -> None:
    name, section = page.rsplit(".", 1)
    text = rendered(page)
    assert text.startswith(f"{name.upper()}({section})")
    assert re.search(rf"^NAME\n +{re.escape(name)} - \S", text, re.MULTILINE)


@pytest.mark.parametrize("command", ["tpops", "tpops-apoppasswd"])
def test_every_help_option_is_in_the_page(command: str) -> None:
    text = rendered(f"{command}.8")
    options = options_of(help_text(command))
    assert {"-h", "--help", "-f"} <= options  # the parse found the options at all
    missing = sorted(o for o in options if not mentions(text, o))
    assert missing == [], f"{command}.8 lacks options of {command} --help"


def test_every_tpops_passwd_subcommand_and_option_is_in_the_page() -> None:
    text = rendered("tpops-passwd.8")
    top = help_text("tpops-passwd")
    choices = re.search(r"\{([\w,-]+)\}", top)
    assert choices is not None, top
    subcommands = choices.group(1).split(",")
    assert subcommands == ["hash", "set", "delete"]
    options = options_of(top)
    for sub in subcommands:
        assert mentions(text, f"tpops-passwd {sub}"), sub  # in SYNOPSIS
        options |= options_of(help_text("tpops-passwd", sub))
    assert {"--scheme", "--mysql", "--password-column", "--file"} <= options
    missing = sorted(o for o in options if not mentions(text, o))
    assert missing == [], "tpops-passwd.8 lacks options of tpops-passwd [SUBCOMMAND] --help"


def test_tpops_page_covers_signals_files_exit_status_and_references() -> None:
    text = rendered("tpops.8")
    sections = re.findall(r"^([A-Z][A-Z ]+)$", text, re.MULTILINE)
    for section in ("SYNOPSIS", "DESCRIPTION", "SIGNALS", "TLS", "SECURITY", "FILES", "EXIT STATUS",
                    "EXAMPLES", "SEE ALSO"):
        assert section in sections
    for word in ("SIGTERM", "SIGHUP", "SIGUSR1", "/etc/tpops/tpops.conf", "/run/tpops/", "$access_log",
                 "$error_log", "$tls_cert_file", "inetd.conf(5)", "systemd.socket(5)", "doveadm-pw(1)",
                 "fail2ban-client(1)", "tpops.conf(5)", "tpops-passwd(8)", "tpops-apoppasswd(8)"):
        assert word in text, word


# ---------------------------------------------------------------- tpops.conf(5)

def sample_assignments() -> list[tuple[str, str | None]]:
    """(name, value as written) of every ``$name = value`` line of tpops.conf.sample; the value
    is None for a commented-out example (``#   $maildir_extended = true``)."""
    out: list[tuple[str, str | None]] = []
    for line in (REPO / "tpops.conf.sample").read_text().splitlines():
        if m := re.match(r"\$(\w+)\s*=\s*(.*?)\s*(?:#.*)?$", line):
            out.append((m.group(1), m.group(2)))
        elif m := re.match(r"#\s*\$(\w+)\s*=", line):
            out.append((m.group(1), None))
    return out


def test_conf_page_parameter_list_is_generated_from_the_schema() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-man-conf"), "--check"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_sample_parameter_is_in_the_conf_page_with_its_default() -> None:
    text = rendered("tpops.conf.5")
    assignments = sample_assignments()
    names = {name for name, _ in assignments}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert names == set(fields), "tpops.conf.sample and the schema name different parameters"
    schema = dict(line.split(" = ", 1) for line in format_effective(Config()).splitlines())
    for name, value in assignments:
        if value is None:
            continue
        if fields[name].default is dataclasses.MISSING:
            default = value  # host-dependent ($hostname, $passwd_lock_dir): the page shows the sample's form
        else:
            default = schema[f"${name}"]
            # the sample sets the default, maybe written otherwise (60*60 for 3600)
            assert getattr(parse_config(f"${name} = {value}\n"), name) == fields[name].default, name
        assert re.search(rf"^ +\${name} = {re.escape(default)}$", text, re.MULTILINE), f"${name} = {default}"


def test_conf_page_explains_the_syntax_and_backends() -> None:
    text = rendered("tpops.conf.5")
    for word in ("'Passwd'", "'File'", "'MySQL'", "`uname -n`.chomp", "Syslog::LOG_MAIL", "--check-config",
                 "STLS", "$disable_plaintext_auth", "tpops(8)"):
        assert word in text, word


# ---------------------------------------------------------------- installation

def test_pip_installs_the_pages_under_share_man(tmp_path: Path) -> None:
    """A wheel built from the package's files, installed into a fresh venv, puts the pages
    where man(1) looks: <venv>/share/man/man5 and man8.

    The build runs on a copy (an in-tree build would leave build/ and *.egg-info behind),
    and the install goes to a new venv through ``pip --python``: ``pip install --prefix``
    would uninstall the suite's own editable tpops first.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("src", "man"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                           check=False, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("tpops-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        data = sorted(n.split(".data/data/", 1)[1] for n in zf.namelist() if ".data/data/" in n)
    assert data == ["share/man/man5/tpops.conf.5", "share/man/man8/tpops-apoppasswd.8",
                    "share/man/man8/tpops-passwd.8", "share/man/man8/tpops.8"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                                "--no-index", str(wheel)],
                               check=False, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    for page in PAGES:
        target = venv / "share" / "man" / f"man{page.rsplit('.', 1)[1]}" / page
        assert target.read_bytes() == (MAN / page).read_bytes(), page
