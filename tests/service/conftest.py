"""Store fixtures: every store test runs on SQLite (a file under tmp_path) and on PostgreSQL.

PostgreSQL comes from AFINA_TEST_DATABASE_URL (`.ci/run` sets it); each test gets a schema of its
own, dropped afterwards, so tests start from a blank database and never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from afina.store import Store, open_store
from afina.store.database import parse_url

POSTGRES_ENV = "AFINA_TEST_DATABASE_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> Iterator[str]:
    """The URL of a blank database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"PostgreSQL store tests need {POSTGRES_ENV} "
                    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
    url = parse_url(base)
    schema = f"afina_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened
