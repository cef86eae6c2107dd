"""Amended results on the API and the job page: a series reopened by late instances is run
again (generation 1); the latest run is shown with links to the earlier one, and the earlier
one points to the latest."""

from __future__ import annotations

from sqlalchemy import select

from dicom_ai_node.jobs.models import Job, JobState, Result
from dicom_ai_node.jobs.queue import versions


def test_job_page_and_api_show_the_latest_result_and_its_history(serve, job_log):
    first = job_log.add("first", JobState.DONE, 0.4)
    with job_log.sessions.begin() as session:
        earlier = session.get(Job, first)
        assert earlier is not None
        later = Job(
            study_instance_uid=earlier.study_instance_uid,
            series_instance_uid=earlier.series_instance_uid,
            generation=1,
            modality="CR",
            route=earlier.route,
            state=JobState.DONE.value,
            label="opacity",
            probability=0.9,
            positive=True,
        )
        other_route = Job(
            study_instance_uid=earlier.study_instance_uid,
            series_instance_uid=earlier.series_instance_uid,
            generation=1,
            route="another",
        )
        session.add_all([later, other_route])
        session.flush()
        for job, uid in ((earlier, "1.2.3.1"), (later, "1.2.3.2")):
            session.add(
                Result(
                    sop_instance_uid=uid,
                    job_id=job.id,
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    series_instance_uid="1.2.3",
                    path=f"outbox/{uid}.dcm",
                )
            )
        session.flush()
        assert [j.id for j in versions(session, earlier)] == [first, later.id]
        latest = later.id
        assert session.scalars(select(Result).where(Result.job_id == latest)).one()
    running = serve()
    with running.client() as client:
        detail = client.get(f"/api/jobs/{latest}").json()
        new_page = client.get(f"/jobs/{latest}").text
        old_page = client.get(f"/jobs/{first}").text
    assert [(v["id"], v["generation"], v["sr_uid"]) for v in detail["versions"]] == [
        (first, 0, "1.2.3.1"),
        (latest, 1, "1.2.3.2"),
    ]
    assert 'id="versions"' in new_page and f'href="/jobs/{first}"' in new_page
    assert 'id="amended"' not in new_page
    assert 'id="amended"' in old_page and f'href="/jobs/{latest}"' in old_page
