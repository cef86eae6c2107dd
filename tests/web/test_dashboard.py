"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from sqlalchemy import select

from dicom_ai_node.dispatch.scu import Peer, send_files
from dicom_ai_node.infer.prediction import percent
from dicom_ai_node.jobs.models import Job
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.synth import Label, Task, generate_studies
from dicom_ai_node.web.server import HttpServer
from tests.support.helpers import wait_for
from tests.support.joblog import TOKEN

pytestmark = pytest.mark.peers

CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium; fails (not skips) without it: `make test` installs it."""
    if shutil.which(CHROMEDRIVER) is None:
        pytest.fail("chromium-driver is not installed; `make test` installs it")
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1440,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_dashboard_of_a_node_that_read_two_studies(
    node_factory, demo_models, shipped_routes, browser, tmp_path
):
    """A real node reads a positive and a negative chest radiograph (C-STORE in, demo model,
    results in the outbox); the dashboard shows the positive one first, with its image."""
    node = node_factory(models=demo_models, routes=shipped_routes)
    studies = {
        label: generate_studies(Task.CXR_OPACITY, label, 1, tmp_path / label.value, seed=4242)[0]
        for label in (Label.NEGATIVE, Label.POSITIVE)
    }
    for study in studies.values():
        sent = send_files(
            sorted(study.rglob("*.dcm")), Peer("AINODE", "127.0.0.1", node.scp.port, "MODALITY")
        )
        assert all(outcome.ok for outcome in sent)

    def finished() -> bool:
        with node.read_sessions() as session:
            states = session.scalars(select(Job.state)).all()
        return len(states) == 2 and all(state == "done" for state in states)

    wait_for(finished, timeout=120)
    http = HttpServer(
        node.sessions,
        read_sessions=node.read_sessions,
        metrics=NodeMetrics(node.read_sessions),
        health=lambda: [],
        port=0,
        token=TOKEN,
        node_name=node.settings.node_name,
        data_dir=node.settings.storage.data_dir,
    )
    http.start()
    try:
        base = f"http://127.0.0.1:{http.port}"
        browser.get(f"{base}/?token={TOKEN}")
        rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
        assert [row.get_attribute("data-triage") for row in rows] == ["positive", "negative"]
        positive_study = studies[Label.POSITIVE].name
        with node.read_sessions() as session:
            positive = session.scalars(
                select(Job).where(Job.study_instance_uid == positive_study)
            ).one()
        assert rows[0].get_attribute("data-job") == str(positive.id)
        assert percent(positive.probability) in rows[0].text
        marker = rows[0].find_element(By.CSS_SELECTOR, ".tag .marker")
        assert marker.value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"
        browser.save_screenshot(str(tmp_path / "worklist.png"))

        rows[0].find_element(By.CSS_SELECTOR, "a").click()
        image = browser.find_element(By.CSS_SELECTOR, "img.result-image")
        width = browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        )
        assert width and width > 0
        assert positive.label in browser.find_element(By.ID, "finding").text
        events = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
        assert any("series complete" in event for event in events)
        assert any("job done" in event for event in events)
        browser.save_screenshot(str(tmp_path / "job.png"))

        browser.get(f"{base}/jobs?state=done")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 2
        browser.get(f"{base}/destinations")
        assert "ready" in browser.find_element(By.TAG_NAME, "main").text
        browser.save_screenshot(str(tmp_path / "destinations.png"))
    finally:
        http.stop()
    assert (tmp_path / "worklist.png").stat().st_size > 10_000
    assert (tmp_path / "job.png").stat().st_size > 10_000
