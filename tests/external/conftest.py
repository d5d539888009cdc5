"""Fixtures for tests against real external servers: here a throwaway PostgreSQL cluster.

One cluster serves the whole session (initdb takes a second or two); each
test gets a database of its own, so tests never see each other's rows and a
test may crash and restart the server without harming the others.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.helpers.postgres import PostgresCluster, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL server for the session, skipped (not failed) where it is not installed."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> Iterator[str]:
    """The URL of a fresh, empty database (``t_<random>``), dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    with postgres.connect() as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield postgres.url_for(name)
    postgres.start()  # a no-op unless the test left the server down
    with postgres.connect() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
