"""Test marks: :func:`root_only` (the hook that applies it is in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

from tests.support.server import IS_ROOT

__all__ = ["IN_CI", "IS_ROOT", "root_only"]

#: CI runs as root: there a root-only test must run, never skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def root_only(why: str) -> pytest.MarkDecorator:
    """Mark a test that needs root (system users, identity changes, a private /dev/log).

    As an ordinary user outside CI it is skipped with ``why``; in CI (CI=true), which
    runs as root, it can never be skipped: without root it fails (pytest_runtest_setup).
    """
    return pytest.mark.root_only(why)

