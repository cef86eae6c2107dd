"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dicom_ai_node.jobs.models import JobState, utcnow
from tests.web.support import TOKEN

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


def test_worklist_and_job_page_in_a_browser(serve, job_log, browser, tmp_path):
    earlier = utcnow() - timedelta(minutes=40)
    job_log.add(
        "NEG-1", JobState.DONE, 0.08, image=True, deliveries={"pacs": "done"}, created=earlier
    )
    positive = job_log.add(
        "POS-1", JobState.DONE, 0.91, image=True, deliveries={"pacs": "done"}, priority=1
    )
    job_log.add("WAIT-1", JobState.QUEUED)
    running = serve()

    browser.get(f"{running.base}/?token={TOKEN}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    assert [row.get_attribute("data-triage") for row in rows] == ["positive", "pending", "negative"]
    assert rows[0].get_attribute("data-job") == str(positive)
    assert "PID-POS-1" in rows[0].text
    assert "91%" in rows[0].text
    marker = rows[0].find_element(By.CSS_SELECTOR, ".tag .marker")
    assert marker.value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"
    browser.save_screenshot(str(tmp_path / "worklist.png"))

    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    image = browser.find_element(By.CSS_SELECTOR, "img.result-image")
    loaded = browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", image
    )
    assert loaded and loaded > 0
    assert "opacity" in browser.find_element(By.ID, "finding").text
    events = browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
    assert events and "job queued" in events[0].text
    browser.save_screenshot(str(tmp_path / "job.png"))

    browser.get(f"{running.base}/destinations")
    assert "ok" in browser.find_element(By.CSS_SELECTOR, "[data-destination=pacs]").text
    browser.save_screenshot(str(tmp_path / "destinations.png"))
    browser.get(f"{running.base}/jobs")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 3
    browser.save_screenshot(str(tmp_path / "jobs.png"))
    assert all((tmp_path / f"{page}.png").stat().st_size > 10_000 for page in ("worklist", "job"))
