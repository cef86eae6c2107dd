"""A Typer app with the ML commands registered as cli.py registers them."""

from __future__ import annotations

import pytest
import typer

from dicom_ai_node.cli_ml import evaluate, models_app, synth, train


@pytest.fixture(scope="session")
def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    app.command("synth")(synth)
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    return app
