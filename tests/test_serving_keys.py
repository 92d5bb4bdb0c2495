"""The admin key of the Serve app: made once, owner-only, found by clients; admin routes never open by default.

Fast: settings, files and the request checks of one replica, without Ray (the HTTP side is covered by
test_serving.py and test_serving_inputs.py against real Serve apps).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from starlette.requests import Request

from services.serving.config import AppArgs, ReplicaConfig, hash_key, replica_config
from services.serving.keys import ServingKeys, admin_key_path, ensure_admin_key, read_admin_key, serving_keys
from services.serving.requests import ApiError, RequestReader
from services.settings import STANDARD_ENV, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DIKI_") or name in STANDARD_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def request(headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/admin/reload",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope)


def reader(cfg: ReplicaConfig) -> RequestReader:
    return RequestReader(cfg)


def test_the_key_file_is_made_once_owner_only_and_found_by_clients(tmp_path: Path) -> None:
    settings = Settings.load(home=tmp_path / "home")
    path = admin_key_path(settings)
    assert path == tmp_path / "home" / "serve" / "admin.key" and not path.exists()
    assert read_admin_key(settings) is None  # a client never creates it

    keys: list[str | None] = []
    threads = [threading.Thread(target=lambda: keys.append(ensure_admin_key(settings))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and keys[0] and len(keys[0]) >= 40  # eight at once: one key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_admin_key(settings) == read_admin_key(settings) == keys[0]
    assert serving_keys(settings) == ServingKeys(api_key=None, admin_key=keys[0])
    assert keys[0] not in repr(serving_keys(settings))

    path.chmod(0o644)  # made readable by others by hand: owner-only again when read
    assert read_admin_key(settings) == keys[0] and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_explicit_key_wins_and_the_app_config_carries_only_its_hash(tmp_path: Path) -> None:
    settings = {"home": str(tmp_path / "home"), "serve": {"admin_key": "explicit-admin-key-0123456789"}}
    cfg, _ = replica_config(AppArgs(settings=settings))
    assert cfg.admin_key_sha256 == hash_key("explicit-admin-key-0123456789") and not cfg.admin_open
    assert "explicit-admin-key-0123456789" not in cfg.model_dump_json()
    assert not admin_key_path(Settings.load(**settings)).exists(), "no file when the key is given"
    assert read_admin_key(Settings.load(**settings)) == "explicit-admin-key-0123456789"


def test_building_the_app_makes_the_key_and_the_replica_checks_it(tmp_path: Path) -> None:
    settings = {"home": str(tmp_path / "home"), "serve": {"api_key": "classify-key-0123456789"}}
    cfg, _ = replica_config(AppArgs(settings=settings))
    key = read_admin_key(Settings.load(**settings))
    assert key and cfg.admin_key_sha256 == hash_key(key)
    r = reader(cfg)
    for headers, code in (
        ({}, "missing_api_key"),
        ({"X-API-Key": "classify-key-0123456789"}, "invalid_api_key"),  # the classify key is not the admin key
        ({"X-Admin-Key": "wrong"}, "invalid_api_key"),
    ):
        with pytest.raises(ApiError) as err:
            r.check_admin(request(headers))
        assert (err.value.status, err.value.code) == (401, code)
        assert err.value.response().headers["www-authenticate"] == 'ApiKey header="X-Admin-Key"'
    r.check_admin(request({"X-Admin-Key": key}))
    r.check_admin(request({"X-API-Key": "classify-key-0123456789", "X-Admin-Key": key}))
    r.check_admin(request({"Authorization": f"Bearer {key}"}))


def test_without_any_key_the_admin_routes_are_closed_and_admin_open_opens_them(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the key's folder would go")
    settings = {"home": str(tmp_path / "home"), "serve": {"admin_key_file": str(blocked / "admin.key")}}
    cfg, _ = replica_config(AppArgs(settings=settings))
    assert cfg.admin_key_sha256 is None and not cfg.admin_open
    with pytest.raises(ApiError) as err:
        reader(cfg).check_admin(request({"X-Admin-Key": "anything"}))
    assert (err.value.status, err.value.code) == (403, "admin_disabled")

    dev, _ = replica_config(AppArgs(settings={"home": str(tmp_path / "dev"), "serve": {"admin_open": True}}))
    assert dev.admin_open and dev.admin_key_sha256 is None
    reader(dev).check_admin(request({}))
    assert not admin_key_path(Settings.load(home=tmp_path / "dev")).exists()


def test_the_body_limit_is_capped_by_max_request_bytes(tmp_path: Path) -> None:
    cfg, _ = replica_config(AppArgs(settings={"home": str(tmp_path / "home")}, max_batch_size=16))
    r = reader(cfg)
    assert cfg.max_request_bytes == 32 * 1024 * 1024
    # One image of the largest size still fits; a batch is bounded by the cap, not by 16 x 10 MiB.
    assert r.body_limit(1) > cfg.max_image_bytes * 4 // 3
    assert r.body_limit(16) == cfg.max_request_bytes < 16 * cfg.max_image_bytes
