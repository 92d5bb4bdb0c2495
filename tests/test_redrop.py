"""A learned dataset dropped again under its own name, after a duplicate under another name, keeps its record.

Real Prefect (the session's test harness), Ray, MLflow (SQLite) and a local storage root; the tiny
random backbone trained for one epoch, as in ``test_pipeline.py`` (whose helpers this uses).
"""

from __future__ import annotations

import time

import pytest

from services.settings import Settings
from tests.test_pipeline import datasets_json, drop, local_dataset, start_prefect_harness, write_config
from tests.test_training import QUADS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return start_prefect_harness(request)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    from services.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(Settings.load(home=str(tmp_path_factory.mktemp("ray-home")), ray={"num_cpus": 2}))
    yield
    shutdown_ray()


def test_a_served_dataset_dropped_again_under_its_name_keeps_its_served_record(prefect_api, ray_session, tmp_path):
    from pipelines.state import Stage, StateStore
    from pipelines.watcher import watch_incoming
    from services.registry import Registry
    from services.storage import open_storage

    config = write_config(tmp_path, None)
    settings = Settings.load(config)
    storage = open_storage(settings)
    store = StateStore(storage, settings)
    data = local_dataset(tmp_path / "src", "x", QUADS, seed=0)

    drop(settings, data, "x")
    [first] = watch_incoming(config=str(config))["results"]
    assert (first["name"], first["status"], first["version"]) == ("x", "served", 1)
    served = store.get("x")
    assert served is not None and served.stage == Stage.DONE and served.dataset_uri and served.task_index == 0

    # The same data under another name: a duplicate of x (fine).
    drop(settings, data, "y")
    [second] = watch_incoming(config=str(config))["results"]
    assert (second["status"], second["duplicate_of"]) == ("duplicate", "x")

    # And again under its own name: recognised as x's own content; x's record stays what it was.
    time.sleep(1.1)
    drop(settings, data, "x")
    [third] = watch_incoming(config=str(config))["results"]
    assert (third["status"], third["version"], third["duplicate_of"]) == ("duplicate", 1, "x")

    again = store.get("x")
    assert again is not None
    assert again.duplicate_of == "x", "x must not become a duplicate of y (nor y's twin)"
    assert (again.version, again.task_index, again.fingerprint) == (1, 0, served.fingerprint)
    assert again.dataset_uri == served.dataset_uri and again.location == served.location
    assert again.run_id == served.run_id and again.task_datasets == served.task_datasets
    assert storage.is_file(f"{served.location}/_SUCCESS"), "the accepted data the version names is kept"
    assert not storage.exists("incoming/x")
    twin = store.get("y")
    assert twin is not None and twin.duplicate_of == "x"
    assert [v.version for v in Registry(settings).list_versions()] == [1]

    rows = datasets_json(config)
    assert "served as task 0 in bundle version 1 (production)" in rows["x"]["detail"]
    assert rows["y"]["detail"] == "same content as 'x': served as task 0 in bundle version 1 (production)"
