"""The package type-checks clean with mypy (its settings are pyproject.toml's [tool.mypy]):
run in the test suite, so CI fails on a type error as it fails on a broken test."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean_on_the_package(tmp_path: Path) -> None:
    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                                str(ROOT / "batchkimi")])
    assert status == 0, out + err
