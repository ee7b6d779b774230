"""The suite needs nothing outside the repository: no test or script reads a sibling ../shared.

A newcomer's ``git clone`` has no reference directory next to it, so every fixture a test
reads lives in the repository (tests/data/). This looks at the source of every test
module, support module and script for a path that climbs out of the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Ways a path to the reference directory next to the repository gets written.
OUTSIDE = re.compile(
    r"""
    \.\./shared                     # "../shared/seed/..."
    | /work/shared                  # the absolute path of the reference directory
    | ["']shared/                   # REPO.parent / "shared/seed/..."
    | \bSHARED\b                    # a constant naming it
    | \bREPO\.parent\b              # the repository's parent directory
    """,
    re.VERBOSE,
)


def outside_references(text: str, depth: int) -> list[tuple[int, str]]:
    """(line, text) of each reference out of the repository in the source of a file ``depth`` levels below it."""
    found = list(OUTSIDE.finditer(text))
    # Path(__file__).parents[N] is the repository for N = depth (tests/x.py: 1); above it is outside.
    found += [m for m in re.finditer(r"\.parents\[(\d+)\]", text) if int(m.group(1)) > depth]
    return sorted((text.count("\n", 0, m.start()) + 1, m.group()) for m in found)


def sources() -> list[Path]:
    """Every test and support module and every file under scripts/, but this one."""
    files = sorted(REPO.glob("tests/**/*.py")) + sorted(p for p in (REPO / "scripts").rglob("*")
                                                        if p.is_file() and "__pycache__" not in p.parts)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_the_check_catches_the_old_spellings() -> None:
    for old in ('SEED = Path(__file__).resolve().parents[2] / "seed" / "x.orig"',
                'SEED_SQL = REPO.parent / "shared/seed/x.sql.orig"',
                'from tests.conftest import SHARED'):
        assert outside_references(old, depth=1), old
    assert outside_references('REPO = Path(__file__).resolve().parents[2]', depth=2) == []
    assert outside_references('site.add("shared", "{PLAIN}sharedpw")', depth=1) == []  # a login, not a path


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_source_reaches_outside_the_repository(path: Path) -> None:
    rel = path.relative_to(REPO)
    hits = outside_references(path.read_text(errors="replace"), depth=len(rel.parts) - 1)
    assert hits == [], f"{rel} reads outside the repository (use tests/data/): {hits}"


def test_the_tpops051_fixtures_are_in_the_repository() -> None:
    for name in ("tpops.conf.tpops051", "tpops_auth-mysql.tpops051.sql"):
        assert (REPO / "tests" / "data" / name).is_file(), name
