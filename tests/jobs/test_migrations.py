"""The job log's migrations on SQLite: the schema they build matches the models, 0008
converts what older versions wrote, and a schema newer than the node is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from dicom_ai_node.jobs.db import MIGRATIONS, SchemaTooNewError, create_db_engine, upgrade
from dicom_ai_node.jobs.models import Base


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def test_migrations_build_the_schema_of_the_models(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_0004_makes_paths_relative_and_keeps_one_job_per_key(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO studies (study_instance_uid, patient_id, accession_number, "
                "study_date, study_description, state, generation, first_received_at, "
                "last_received_at) VALUES ('1.2', '', '', '', '', 'complete', 0, "
                "'2026-01-01', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, "
                "attributes, calling_ae_title, instance_count, state, generation, "
                "first_received_at, last_received_at) VALUES ('1.2.3', '1.2', 'CT', '{}', "
                "'X', 1, 'complete', 0, '2026-01-01', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, series_instance_uid, "
                "study_instance_uid, sop_class_uid, transfer_syntax_uid, path, size, "
                "received_at, generation) VALUES ('1.2.3.4', '1.2.3', '1.2', '1.2', '1.2', "
                "'/old/mount/var/incoming/1.2/1.2.3/1.2.3.4.dcm', 1, '2026-01-01', 0)"
            )
        )
        for _ in range(2):  # the same series, generation and route twice (the old race)
            connection.execute(
                text(
                    "INSERT INTO jobs (level, study_instance_uid, series_instance_uid, "
                    "generation, modality, route, outputs, destinations, priority, state, "
                    "attempts, created_at, updated_at) VALUES ('series', '1.2', '1.2.3', 0, "
                    "'CT', 'r', '[]', '[]', 0, 'done', 1, '2026-01-01', '2026-01-01')"
                )
            )
    upgrade(engine)
    with engine.connect() as connection:
        path: str = connection.execute(text("SELECT path FROM instances")).scalar_one()
        keys: list[str | None] = list(
            connection.execute(text("SELECT unique_key FROM jobs ORDER BY id")).scalars()
        )
        assert path == "incoming/1.2/1.2.3/1.2.3.4.dcm"
        assert list(keys) == ["series:1.2.3:0:r", None]
    engine.dispose()


def test_a_schema_newer_than_the_node_is_refused_naming_both_revisions(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    with pytest.raises(SchemaTooNewError, match=rf"revision 9999, newer .* newest is {head}\)"):
        upgrade(engine)
    engine.dispose()
