"""A throwaway PostgreSQL cluster (Debian's ``postgresql``) for the tests that need one.

Started on a free loopback port in a temporary folder, as the ``postgres`` user (PostgreSQL
refuses to run as root), with ``fsync=off``: the tests check behaviour, not durability.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from dicom_ai_node.jobs.db import create_db_engine, upgrade
from tests.support.helpers import free_port


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.fail("PostgreSQL is not installed; run `make test`, which installs it")
    return Path(found[-1]).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running cluster; yields the URL of its database ``ainode``."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
    folder.chmod(0o755)
    data = folder / "data"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            cwd=folder,
        )

    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    as_postgres(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(data / "server.log"),
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
        "-w",
        "start",
    )
    try:
        as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "ainode")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/ainode"
    finally:
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """Create an empty database ``name`` on the server of ``url``; returns its URL."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def empty_job_log(url: str) -> Engine:
    """An engine on the migrated, emptied job log at ``url`` (each test starts afresh)."""
    engine = create_db_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE jobs, predictions, results, deliveries, events, instances, series, "
            "studies, associations, nodes CASCADE"
        )
    return engine
