"""The local server stores registrations and saves results as Antenna does, over real HTTP.

A result whose save fails is answered 200 at POST time, never acknowledged, redelivered after the
reservation timeout and lost after two deliveries. Bodies are built by hand the way ADC sends them
(``worker.testing.adc_wire``).
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.conftest import TOKEN
from worker.testing import adc_wire
from worker.testing.antenna_server import LocalAntenna
from worker.testing.synthetic import SyntheticImage, generate_preset, with_integer_ids

pytestmark = pytest.mark.timeout(60)

SLUG = "quebec_vermont_moths_2023"
QUICK_TIMEOUT_S = 0.3
BINARY = adc_wire.binary_classifier(["moth", "nonmoth"])
SPECIES = adc_wire.quebec_vermont_classifier([f"Species {i}" for i in range(5)])
MOTH = [3.0, -1.0]       # binary logits: moth
NONMOTH = [-2.0, 2.0]    # binary logits: nonmoth
SPECIES_LOGITS = [0.1, 2.0, -0.5, 0.3, 0.0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticImage]:
    return with_integer_ids(generate_preset(tmp_path_factory.mktemp("synthetic"), "tiny", 4), first=101)


@pytest.fixture
def strict(antenna_factory: Callable[..., LocalAntenna]) -> LocalAntenna:
    return antenna_factory(require_registration=True, reservation_timeout_s=QUICK_TIMEOUT_S)


@pytest.fixture
def api() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Token {TOKEN}"
        yield session


def adc_registration(slug: str = SLUG, binary: Any = BINARY, terminal: Any = SPECIES) -> dict:
    return adc_wire.registration_body([adc_wire.pipeline_config(slug, terminal, binary)])


def register(api: requests.Session, server: LocalAntenna, body: dict, project_id: int = 1) -> requests.Response:
    return api.post(f"{server.base_url}/projects/{project_id}/pipelines/", json=body)


def reserve(api: requests.Session, server: LocalAntenna, job_id: int, count: int) -> list[dict]:
    response = api.post(f"{server.base_url}/jobs/{job_id}/tasks/", json={"batch_size": count})
    assert response.status_code == 200, response.text
    return response.json()["tasks"]


def post(api: requests.Session, server: LocalAntenna, job_id: int, task: dict, result: dict) -> requests.Response:
    return api.post(f"{server.base_url}/jobs/{job_id}/result/",
                    json={"results": [{"reply_subject": task["reply_subject"], "result": result}]})


def adc_result(task: dict, detections: list[adc_wire.AdcDetection], slug: str = SLUG) -> dict:
    return adc_wire.result(slug, task["image_id"], task["image_url"], detections, SPECIES, BINARY)


def moth_and_nonmoth() -> list[adc_wire.AdcDetection]:
    return [adc_wire.AdcDetection((10, 12, 40, 44), MOTH, SPECIES_LOGITS),
            adc_wire.AdcDetection((50, 20, 70, 41), NONMOTH)]


def one_task_job(api: requests.Session, server: LocalAntenna, images: list[SyntheticImage]) -> tuple[int, dict]:
    job_id = server.add_job(images[:1], SLUG)
    return job_id, reserve(api, server, job_id, 1)[0]


# --------------------------------------------------------------------------- registration


def test_registering_twice_changes_nothing(strict: LocalAntenna, api: requests.Session) -> None:
    first = register(api, strict, adc_registration())
    assert first.status_code == 201, first.text
    assert first.json()["pipelines_created"] == [SLUG]
    assert first.json()["algorithms_created"] == [adc_wire.DETECTOR_KEY, adc_wire.BINARY_KEY, SPECIES.key]
    before = strict.registry.snapshot()
    second = register(api, strict, adc_registration())
    assert second.status_code == 201
    assert (second.json()["pipelines_created"], second.json()["pipelines_updated"]) == ([], [SLUG])
    assert second.json()["algorithms_created"] == []
    assert strict.registry.snapshot() == before
    assert before["pipelines"][SLUG]["algorithms"] == [adc_wire.DETECTOR_KEY, adc_wire.BINARY_KEY, SPECIES.key]
    assert before["algorithms"][SPECIES.key]["category_map_entries"] == 5


def test_a_category_map_is_stored_once_and_never_replaced(strict: LocalAntenna, api: requests.Session) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    reordered = adc_wire.quebec_vermont_classifier([f"Species {i}" for i in reversed(range(7))])
    assert register(api, strict, adc_registration(terminal=reordered)).status_code == 201
    stored = strict.registry.snapshot()["algorithms"][SPECIES.key]
    assert stored["labels"] == list(SPECIES.labels) and stored["category_map_entries"] == 5


def test_a_classifier_without_a_category_map_is_refused(strict: LocalAntenna, api: requests.Session) -> None:
    body = adc_registration()
    body["pipelines"][0]["algorithms"][2]["category_map"] = None
    response = register(api, strict, body)
    assert response.status_code == 400 and SPECIES.key in response.json()["detail"]
    # As on Antenna: the algorithm row exists (created before the map check), unlinked, with no map.
    snapshot = strict.registry.snapshot()
    assert SPECIES.key not in snapshot["pipelines"][SLUG]["algorithms"]
    assert snapshot["algorithms"][SPECIES.key]["category_map_entries"] == 0
    assert register(api, strict, adc_registration()).status_code == 201, "a later map is stored"
    assert strict.registry.snapshot()["algorithms"][SPECIES.key]["category_map_entries"] == 5


def test_algorithm_key_and_name_version_are_unique(strict: LocalAntenna, api: requests.Session) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    same_key_v2 = adc_registration(slug="other_slug")
    same_key_v2["pipelines"][0]["name"] = "Other pipeline"
    same_key_v2["pipelines"][0]["algorithms"][2]["version"] = 2
    response = register(api, strict, same_key_v2)
    assert response.status_code == 400 and "key is unique" in response.json()["detail"]
    same_name_new_key = adc_registration(slug="third_slug")
    same_name_new_key["pipelines"][0]["name"] = "Third pipeline"
    same_name_new_key["pipelines"][0]["algorithms"][2]["key"] = "renamed_key"
    response = register(api, strict, same_name_new_key)
    assert response.status_code == 400 and "(name, version) is unique" in response.json()["detail"]


def test_a_pipeline_is_found_by_name_and_version_when_its_slug_is_new(strict: LocalAntenna, api) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    renamed = adc_registration(slug="renamed_slug")
    response = register(api, strict, renamed)
    assert response.json()["pipelines_updated"] == ["quebec_vermont_moths_2023"]
    assert "renamed_slug" not in strict.registry.snapshot()["pipelines"]


def test_projects_are_listed_ten_per_page_with_next(antenna_factory, api: requests.Session) -> None:
    server = antenna_factory(project_count=12)
    first = api.get(f"{server.base_url}/projects/").json()
    assert first["count"] == 12 and [p["id"] for p in first["results"]] == list(range(1, 11))
    second = api.get(first["next"]).json()
    assert [p["id"] for p in second["results"]] == [11, 12] and second["next"] is None
    assert second["previous"] == f"{server.base_url}/projects/?page=1"
    assert api.get(f"{server.base_url}/projects/?page=3").status_code == 404
    assert register(api, server, adc_registration(), project_id=12).status_code == 201


# --------------------------------------------------------------------------- save


def test_an_adc_result_for_an_adc_registration_is_saved(strict, api, images) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    job_id, task = one_task_job(api, strict, images)
    assert post(api, strict, job_id, task, adc_result(task, moth_and_nonmoth())).status_code == 200
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.complete) == (1, 0, True)


def test_an_unregistered_pipeline_is_accepted_never_acked_redelivered_then_lost(strict, api, images) -> None:
    job_id, task = one_task_job(api, strict, images)
    response = post(api, strict, job_id, task, adc_result(task, moth_and_nonmoth()))
    assert response.status_code == 200 and response.json()["results_queued"] == 1
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.reserved) == (0, 1, 1)
    assert "is not registered" in report.unsaved_reasons[0]
    time.sleep(QUICK_TIMEOUT_S + 0.1)
    again = reserve(api, strict, job_id, 5)
    assert [t["image_id"] for t in again] == [task["image_id"]], "redelivered after the reservation timeout"
    assert post(api, strict, job_id, again[0], adc_result(again[0], moth_and_nonmoth())).status_code == 200
    time.sleep(QUICK_TIMEOUT_S + 0.1)
    assert reserve(api, strict, job_id, 5) == [], "two deliveries, then no more"
    report = strict.report(job_id)
    assert (report.results_unsaved, report.lost, report.redeliveries, report.settled) == (2, 1, 1, True)


def test_an_error_result_is_saved_for_an_unregistered_pipeline(strict, api, images) -> None:
    job_id, task = one_task_job(api, strict, images)
    assert post(api, strict, job_id, task, {"error": "x", "image_id": task["image_id"]}).status_code == 200
    report = strict.report(job_id)
    assert (report.results_error, report.results_unsaved, report.complete) == (1, 0, True)


@pytest.mark.parametrize("break_it, reason", [
    (lambda r: r["detections"][0]["algorithm"].update(key="other_detector"), "detection algorithm 'other_detector'"),
    (lambda r: r["detections"][0]["classifications"][1]["algorithm"].update(key="unknown_species"),
     "algorithm 'unknown_species' is not registered"),
    (lambda r: r["detections"][0]["classifications"][1].update(scores=[]), "scores are empty"),
    (lambda r: r["detections"][0]["classifications"][1].update(scores=[0.1] * 6), "6 scores for a category map of 5"),
])
def test_a_result_antenna_cannot_save_is_answered_200_and_left_unacknowledged(
        strict, api, images, break_it, reason) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    job_id, task = one_task_job(api, strict, images)
    result = adc_result(task, moth_and_nonmoth())
    break_it(result)
    assert post(api, strict, job_id, task, result).status_code == 200
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.reserved) == (0, 1, 1)
    assert reason in report.unsaved_reasons[0]


def test_a_source_image_id_that_is_not_an_integer_is_never_saved(strict, api, tmp_path) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    named = generate_preset(tmp_path, "tiny", 1)  # ids like "tiny-s0-00000"
    job_id, task = one_task_job(api, strict, named)
    assert post(api, strict, job_id, task, adc_result(task, moth_and_nonmoth())).status_code == 200
    report = strict.report(job_id)
    assert report.results_unsaved == 1 and "is not an integer" in report.unsaved_reasons[0]


def test_a_second_detector_under_a_slug_breaks_every_later_save(strict, api, images) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    other = adc_registration()
    other["pipelines"][0]["algorithms"][0].update(name="Another detector", key="another_detector")
    assert register(api, strict, other).status_code == 201
    assert strict.registry.snapshot()["pipelines"][SLUG]["algorithms"][-1] == "another_detector"
    job_id, task = one_task_job(api, strict, images)
    assert post(api, strict, job_id, task, adc_result(task, moth_and_nonmoth())).status_code == 200
    report = strict.report(job_id)
    assert report.results_unsaved == 1 and "2 detection algorithms" in report.unsaved_reasons[0]


def test_the_post_still_validates_the_whole_body_first(strict, api, images) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    job_id = strict.add_job(images[:2], SLUG)
    tasks = reserve(api, strict, job_id, 2)
    good = adc_result(tasks[0], moth_and_nonmoth())
    bad = adc_result(tasks[1], moth_and_nonmoth())
    del bad["detections"][0]["bbox"]
    response = api.post(f"{strict.base_url}/jobs/{job_id}/result/", json={"results": [
        {"reply_subject": tasks[0]["reply_subject"], "result": good},
        {"reply_subject": tasks[1]["reply_subject"], "result": bad}]})
    assert response.status_code == 400
    report = strict.report(job_id)
    assert (report.results_ok, report.results_unsaved, report.rejected_posts) == (0, 0, 1)


def test_lenient_mode_saves_unregistered_slugs_but_checks_registered_ones(antenna_factory, api, images) -> None:
    lenient = antenna_factory()
    job_id = lenient.add_job(images[:2], SLUG)
    tasks = reserve(api, lenient, job_id, 2)
    assert post(api, lenient, job_id, tasks[0], adc_result(tasks[0], moth_and_nonmoth())).status_code == 200
    assert lenient.report(job_id).results_ok == 1, "unregistered: saved unchecked"
    body = adc_registration()
    body["pipelines"][0]["algorithms"].pop(1)  # no binary filter registered
    assert register(api, lenient, body).status_code == 201
    assert post(api, lenient, job_id, tasks[1], adc_result(tasks[1], moth_and_nonmoth())).status_code == 200
    report = lenient.report(job_id)
    assert report.results_unsaved == 1 and adc_wire.BINARY_KEY in report.unsaved_reasons[0]


def test_a_nan_fails_the_whole_post_as_antennas_strict_json_parser_does(strict, api, images) -> None:
    assert register(api, strict, adc_registration()).status_code == 201
    job_id, task = one_task_job(api, strict, images)
    item = {"reply_subject": task["reply_subject"], "result": adc_result(task, moth_and_nonmoth())}
    body = json.dumps({"results": [item]}).replace('"total_time": 0.5', '"total_time": NaN')
    response = api.post(f"{strict.base_url}/jobs/{job_id}/result/", data=body,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "NaN" in response.json()["detail"]
    assert strict.report(job_id).results_ok == 0
