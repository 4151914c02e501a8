"""Database engine and sessions for one process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from fleetvm.db.models import Base
from fleetvm.settings import Settings

#: Key of the PostgreSQL advisory lock held while creating tables.
SCHEMA_LOCK_KEY = 0x666C6565  # "flee"


def _enable_sqlite_concurrency(dbapi_connection, connection_record) -> None:
    # The API and the worker are separate processes writing the same file:
    # WAL lets readers run beside a writer, and busy_timeout makes a writer
    # wait for the lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=settings.database.echo,
            connect_args={"check_same_thread": False, "timeout": 10},
        )
        event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine
    pool_size = settings.database.pool_size
    return create_engine(
        url,
        echo=settings.database.echo,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
    )


class Database:
    """An engine and its session factory, created once per process."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        """Create missing tables.

        In a cluster every API and worker process does this at start, often at
        the same moment. Two concurrent CREATE TABLE of one name fail, so on
        PostgreSQL an advisory lock makes them take turns.
        """
        if self.engine.dialect.name != "postgresql":
            Base.metadata.create_all(self.engine)
            return
        with self.engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY}
            )
            Base.metadata.create_all(connection)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on error."""
        with self.sessionmaker() as db:
            try:
                yield db
                db.commit()
            except BaseException:
                db.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
