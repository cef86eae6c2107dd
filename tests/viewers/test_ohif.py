"""What a radiologist sees in OHIF v3: the node's results opened in headless Chromium.

One module-scoped run: Orthanc (DICOMweb plugin) holds a positive and a negative synthetic
study of each bundled model; the node received them by C-STORE and sent its results to
Orthanc by STOW-RS. OHIF (npm ``@ohif/app``, ``make ohif``) is served on loopback with
``/dicom-web`` proxied to Orthanc. The checks read OHIF's own state (its display sets, the
SR's measurements) and the DOM (the study list, the text drawn on the image), not pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait
from sqlalchemy import select

from dicom_ai_node.jobs.models import Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import make_settings, require, run_tool, wait_for
from tests.support.ohif import serving_ohif
from tests.support.orthanc import Orthanc

pytestmark = [pytest.mark.peers, pytest.mark.slow]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
)


@dataclass(frozen=True)
class Study:
    uid: str
    accession: str
    description: str
    task: Task
    label: Label
    job: Job


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewers")


@pytest.fixture(scope="module")
def orthanc(module_tmp: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(module_tmp / "orthanc", plugins=("dicomweb",))
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def studies(
    module_tmp: Path,
    orthanc: Orthanc,
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
) -> Iterator[list[Study]]:
    """The four studies in Orthanc with the node's results, once the jobs are done."""
    settings = make_settings(
        module_tmp / "node",
        routes=[{**route, "destinations": ["web"]} for route in shipped_routes],
        destinations=[{"name": "web", "type": "dicomweb", "url": orthanc.dicomweb_url}],
    )
    node = Node(settings, models=demo_models)
    node.start()
    try:
        made = []
        for task in Task:
            for label in Label:
                folder = generate_studies(task, label, 1, module_tmp / "synth", 11)[0]
                port = str(node.scp.port)
                run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", port, str(folder))
                files = sorted(path for path in folder.rglob("*") if path.is_file())
                orthanc.upload(files)  # the PACS has the study the node was sent
                header = dcmread(files[0], stop_before_pixels=True)
                accession, description = header.AccessionNumber, header.StudyDescription
                made.append((folder.name, str(accession), str(description), task, label))
        yield [Study(*study, job=wait_for(partial(_done, node, study[0]), 120)) for study in made]
    finally:
        node.stop()


def _script(script: str, argument: str, driver: webdriver.Chrome) -> Any:
    return driver.execute_script(script, argument)


def _done(node: Node, uid: str) -> Job | None:
    with node.read_sessions() as session:
        job = session.scalars(select(Job).where(Job.study_instance_uid == uid)).first()
    return job if job is not None and job.state == "done" else None


@pytest.fixture(scope="module")
def browser(module_tmp: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={module_tmp / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(require("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ohif_lists_renders_and_labels_every_result(
    studies: list[Study],
    orthanc: Orthanc,
    browser: webdriver.Chrome,
    demo_models: dict[str, Any],
    module_tmp: Path,
) -> None:
    shots = module_tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    with serving_ohif(orthanc.dicomweb_url) as app:
        browser.get(app + "/")
        # OHIF's first-visit tour would open over the viewport on /viewer; marked shown on this
        # origin before any viewer page loads, it never opens (no race with a "Skip all" click)
        browser.execute_script(_TOUR_SHOWN)

        # the study list, fed by QIDO-RS: every study with its description
        def row_of(study: Study) -> str | None:
            rows = browser.execute_script(_LIST_ROWS)
            return next((row for row in rows if study.accession in row), None)

        try:
            WebDriverWait(browser, 120).until(lambda d: all(row_of(study) for study in studies))
        except TimeoutException:
            browser.save_screenshot(str(shots / "study-list-timeout.png"))
            raise AssertionError(
                f"study list: {browser.execute_script(_LIST_ROWS)}; expected "
                f"{[(s.accession, s.description) for s in studies]}; console: "
                f"{browser.get_log('browser')[-20:]}"
            ) from None
        for study in studies:
            row = row_of(study)
            assert row is not None and study.description in row, (study, row)
        browser.save_screenshot(str(shots / "study-list.png"))

        for study in studies:
            name = f"{study.task}-{study.label}"
            browser.get(f"{app}/viewer?StudyInstanceUIDs={study.uid}")
            WebDriverWait(browser, 120).until(lambda d: d.execute_script(_READY))
            WebDriverWait(browser, 120).until(lambda d: d.execute_script(_DRAWN))
            browser.execute_async_script(_SETTLE)
            # the Secondary Capture in the viewport, without cine controls over it
            series = browser.execute_script(_SHOW, "SC")
            WebDriverWait(browser, 120).until(partial(_script, _SHOWING, series))
            assert browser.execute_script(_CINE) is False, name
            browser.save_screenshot(str(shots / f"{name}-sc.png"))
            browser.execute_async_script(_SETTLE)
            # the SR: its region drawn on the key image, labelled with finding and probability
            series = browser.execute_script(_SHOW, "SR")
            WebDriverWait(browser, 120).until(lambda d: d.execute_script(_SR_DRAWN))
            drawn = browser.execute_script(_SR_DRAWN)
            card = demo_models[str(study.job.model)].card
            meaning = next(lab.code.meaning for lab in card.labels if lab.name == study.job.label)
            assert study.job.probability is not None
            shown = study.job.probability if study.job.positive else 1 - study.job.probability
            # "<finding>: <percent, 2 decimals> %" (the SR stores 4 decimals)
            label = drawn["labels"][0]
            match = re.fullmatch(rf"{re.escape(meaning)}: (\d+\.\d\d) %", label)
            assert match and float(match[1]) == pytest.approx(100 * shown, abs=0.011), label
            assert label in drawn["texts"], (name, drawn)
            browser.save_screenshot(str(shots / f"{name}-sr.png"))

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


# OHIF 3.13.2 skips a tour whose id is in localStorage 'shownTours' (a JSON array of ids);
# its only tour is the viewer's, 'basicViewerTour' (route /viewer).
_TOUR_SHOWN = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
# The text of the study list's rows.
_LIST_ROWS = """
return Array.from(document.querySelectorAll('tr')).map(row => row.textContent);
"""
# The study's display sets are there: the source series, the SR and the SC.
_READY = """
const s = window.services;
if (!s || !s.viewportGridService.getActiveViewportId()) return false;
const sets = s.displaySetService.getActiveDisplaySets();
return sets.some(d => d.Modality === 'SR')
  && sets.some(d => d.SOPClassUID === '1.2.840.10008.5.1.4.1.1.7')
  && sets.some(d => d.SOPClassUID !== '1.2.840.10008.5.1.4.1.1.7' && d.Modality !== 'SR'
                    && d.Modality !== 'KO');
"""
# Put the SR or the SC into the active viewport; returns its Series Instance UID.
_SHOW = """
const s = window.services;
const ds = s.displaySetService.getActiveDisplaySets().find(d => arguments[0] === 'SR'
  ? d.Modality === 'SR' : d.SOPClassUID === '1.2.840.10008.5.1.4.1.1.7');
const viewportId = s.viewportGridService.getActiveViewportId();
window.commandsManager.runCommand('setDisplaySetsForViewports', {
  viewportsToUpdate: [{viewportId, displaySetInstanceUIDs: [ds.displaySetInstanceUID]}]});
return ds.SeriesInstanceUID;
"""
# The active viewport has drawn its image. A viewport replaced before then can log "The
# stack viewport has been destroyed": a resize meanwhile re-applies its position through a
# 40 ms debounced scroll (for an image not yet loaded), whose timer outlives the viewport.
_DRAWN = """
const s = window.services;
const vp = s.cornerstoneViewportService.getCornerstoneViewport(
  s.viewportGridService.getActiveViewportId());
return Boolean(vp && vp.getImageData && vp.getImageData());
"""
# Once drawn, no new debounced scroll starts; a timer set now runs after any earlier one of
# 40 ms (timers of shorter or equal delay run in the order they were set).
_SETTLE = "setTimeout(arguments[arguments.length - 1], 100);"
# The active viewport shows an image of that series, rendered.
_SHOWING = """
const s = window.services;
const vp = s.cornerstoneViewportService.getCornerstoneViewport(
  s.viewportGridService.getActiveViewportId());
const id = vp && vp.getCurrentImageId && vp.getCurrentImageId();
return Boolean(id && id.includes('/series/' + arguments[0] + '/') && vp.getImageData());
"""
_CINE = "return window.services.cineService.getState().isCineEnabled;"
# The SR's measurements, all placed on their images, and the text drawn in the viewport.
_SR_DRAWN = """
const s = window.services;
const sr = s.displaySetService.getActiveDisplaySets().find(d => d.Modality === 'SR');
if (!sr.isLoaded || !sr.measurements || !sr.measurements.length) return null;
if (!sr.measurements.every(m => m.loaded)) return null;
const texts = Array.from(document.querySelectorAll('.viewport-element svg text, svg text'))
  .map(t => t.textContent.trim()).filter(t => t);
if (!texts.length) return null;
return {
  labels: sr.measurements.map(m => m.labels.map(l => l.label + ': ' + l.value).join('; ')),
  texts,
};
"""
