"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from services.datastore.db import make_engine, migrate

SQLITE_FILE = "coterie.db"  # the migrated database's file name in the test's tmp_path


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A migrated SQLite database file in the test's tmp_path (``SQLITE_FILE``), made as the services make theirs."""
    engine = make_engine(f"sqlite:///{tmp_path / SQLITE_FILE}")
    migrate(engine)
    yield engine
    engine.dispose()
