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
    | \.parents\[[2-9]\]            # Path(__file__).parents[2] and above
    | \.parent\.parent\.parent\b    # the same, spelled out
    """,
    re.VERBOSE,
)


def sources() -> list[Path]:
    files = sorted(REPO.glob("tests/**/*.py")) + sorted(p for p in (REPO / "scripts").rglob("*")
                                                        if p.is_file() and "__pycache__" not in p.parts)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_the_pattern_catches_the_old_spellings() -> None:
    for old in ('SEED = Path(__file__).resolve().parents[2] / "shared/seed/x.orig"',
                'SEED_SQL = REPO.parent / "shared/seed/x.sql.orig"',
                'from tests.conftest import SHARED'):
        assert OUTSIDE.search(old), old
    assert not OUTSIDE.search('site.add("shared", "{PLAIN}sharedpw")')  # a login is not a path


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_source_reaches_outside_the_repository(path: Path) -> None:
    text = path.read_text(errors="replace")
    hits = [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
            for m in OUTSIDE.finditer(text)]
    assert hits == [], "reads outside the repository (use tests/data/): " + "; ".join(hits)


def test_the_tpops051_fixtures_are_in_the_repository() -> None:
    for name in ("tpops.conf.tpops051", "tpops_auth-mysql.tpops051.sql"):
        assert (REPO / "tests" / "data" / name).is_file(), name
