"""Object storage through pyarrow.fs: the same tests on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from services.settings import Settings
from services.storage import Storage, StorageError, clean_path, open_storage, validate_dataset_name
from tests.conftest import S3Server

BUCKET = "storage-tests"


@pytest.fixture(scope="module")
def s3_bucket(s3_server: S3Server) -> S3Server:
    endpoint = s3_server.endpoint.removeprefix("http://")
    fs = pafs.S3FileSystem(
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint_override=endpoint,
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir(BUCKET)
    return s3_server


def s3_settings(server: S3Server, root: str, secret: str | None = None) -> Settings:
    return Settings.load(
        storage={"root": root},
        s3={
            "endpoint_url": server.endpoint,
            "access_key_id": server.access_key,
            "secret_access_key": secret or server.secret_key,
        },
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield open_storage(Settings.load(storage={"root": str(tmp_path / "store")}))
        return
    server = request.getfixturevalue("s3_bucket")
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    store = open_storage(s3_settings(server, f"s3://{BUCKET}/{prefix}"))
    yield store
    if store.exists(""):
        store.filesystem.delete_dir(store.root)


def make_dataset(folder: Path) -> dict[str, bytes]:
    files = {
        "labels.json": b'{"classes": ["cat", "dog"]}',
        "images/cat/0.png": b"\x89PNG fake cat",
        "images/dog/0.png": b"\x89PNG fake dog" * 1000,
        "_SUCCESS": b"a marker already in the source is not copied",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def test_files_round_trip(storage: Storage) -> None:
    assert not storage.exists("a/b.txt")
    storage.write_bytes("a/b.txt", b"one")
    storage.write_bytes("a/b.txt", b"two")
    assert storage.read_bytes("a/b.txt") == b"two"
    assert storage.exists("a/b.txt") and storage.is_file("a/b.txt") and storage.exists("a")
    assert not storage.is_file("a")
    storage.put_json("a/c/d.json", {"x": [1, 2]})
    assert storage.get_json("a/c/d.json") == {"x": [1, 2]}
    assert storage.list_dir("a") == ["b.txt", "c"]
    assert storage.list_dir("nothing/here") == []
    assert storage.list_files("a") == ["b.txt", "c/d.json"]
    with pytest.raises(NotADirectoryError):
        storage.list_dir("a/b.txt")


def test_missing_and_malformed_files_say_where(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError, match=r"no file at .*missing\.txt"):
        storage.read_bytes("missing.txt")
    storage.write_bytes("bad.json", b"{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        storage.get_json("bad.json")


def test_uri_and_path(storage: Storage) -> None:
    if storage.is_local:
        assert storage.uri("x/y") == f"file://{storage.root}/x/y"
    else:
        assert storage.uri("x/y").startswith(f"s3://{BUCKET}/t-") and storage.uri("x/y").endswith("/x/y")
    assert storage.path("x/y") == f"{storage.root}/x/y"
    assert storage.path() == storage.root


def test_readers_can_use_filesystem_and_path(storage: Storage) -> None:
    table = pa.table({"label": [0, 1, 1], "name": ["a", "b", "c"]})
    storage.make_dir("tables")
    pq.write_table(table, storage.path("tables/t.parquet"), filesystem=storage.filesystem)
    assert pq.read_table(storage.path("tables/t.parquet"), filesystem=storage.filesystem).equals(table)


def test_copy_tree_writes_data_then_marker(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "dataset"
    files = make_dataset(src)
    storage.write_bytes("incoming/pets/_SUCCESS", b"stale marker from an earlier upload")
    count = storage.copy_tree(src, "incoming/pets")
    assert count == 3
    data_files = sorted(rel for rel in files if rel != "_SUCCESS")
    assert storage.list_files("incoming/pets") == sorted([*data_files, "_SUCCESS"])
    for rel in data_files:
        assert storage.read_bytes(f"incoming/pets/{rel}") == files[rel]
    marker = storage.get_json("incoming/pets/_SUCCESS")
    assert marker == {"files": 3, "bytes": sum(len(files[r]) for r in data_files)}
    if storage.is_local:
        # The marker is written after every data file.
        mtimes = [Path(storage.path(f"incoming/pets/{rel}")).stat().st_mtime_ns for rel in data_files]
        assert Path(storage.path("incoming/pets/_SUCCESS")).stat().st_mtime_ns >= max(mtimes)


def test_copy_tree_rejects_bad_input(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.copy_tree(tmp_path / "nope", "incoming/x")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="'..' segment"):
        storage.copy_tree(tmp_path / "d", "incoming/../x")
    with pytest.raises(ValueError, match="destination prefix"):
        storage.copy_tree(tmp_path / "d", "")


def test_move_and_delete_tree(storage: Storage, tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds")
    storage.copy_tree(tmp_path / "ds", "incoming/pets")
    storage.move_tree("incoming/pets", "quarantine/pets")
    assert not storage.exists("incoming/pets")
    assert storage.list_dir("incoming") == []
    assert storage.list_files("quarantine/pets") == ["_SUCCESS", "images/cat/0.png", "images/dog/0.png", "labels.json"]
    with pytest.raises(FileNotFoundError, match="nothing to move"):
        storage.move_tree("incoming/pets", "quarantine/again")
    storage.copy_tree(tmp_path / "ds", "incoming/pets")
    with pytest.raises(FileExistsError, match="already exists"):
        storage.move_tree("incoming/pets", "quarantine/pets")
    with pytest.raises(ValueError, match="into itself"):
        storage.move_tree("incoming/pets", "incoming/pets/sub")
    storage.delete_tree("quarantine/pets")
    assert not storage.exists("quarantine/pets")
    assert storage.list_dir("quarantine") == []
    storage.delete_tree("quarantine/pets")  # missing: nothing happens
    storage.delete_tree("incoming/pets/labels.json")
    assert not storage.exists("incoming/pets/labels.json")
    with pytest.raises(ValueError, match="storage root"):
        storage.delete_tree("")


@pytest.mark.parametrize(
    "bad", ["../x", "/etc/passwd", "a//b", "a/./b", "a/../b", "a\\b", "a\x00b", "C:/x", "x/" + "y" * 256]
)
def test_paths_from_outside_are_validated(bad: str) -> None:
    with pytest.raises(ValueError):
        clean_path(bad)


def test_clean_path_normalises() -> None:
    assert clean_path("") == ""
    assert clean_path("a/b/") == "a/b"
    assert clean_path("incoming/cats-2024.v1/_SUCCESS") == "incoming/cats-2024.v1/_SUCCESS"


@pytest.mark.parametrize("name", ["cats", "cifar-10", "x", "a_b.c", "0" * 64])
def test_valid_dataset_names(name: str) -> None:
    assert validate_dataset_name(name) == name


@pytest.mark.parametrize("name", ["", "Cats", "-x", ".hidden", "a/b", "..", "a b", "0" * 65, "é"])
def test_invalid_dataset_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid dataset name"):
        validate_dataset_name(name)


def test_write_refuses_root_and_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    store = open_storage(Settings.load(storage={"root": str(tmp_path / "store")}))
    with pytest.raises(ValueError, match="storage root"):
        store.write_bytes("", b"x")
    for i in range(3):
        store.write_bytes("f.bin", bytes([i]) * 10)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["f.bin"]


def test_open_storage_touches_nothing(tmp_path: Path) -> None:
    store = open_storage(Settings.load(storage={"root": str(tmp_path / "store")}))
    assert not (tmp_path / "store").exists()
    assert store.list_dir() == []


def test_s3_errors_name_the_uri_and_hide_credentials(s3_bucket: S3Server) -> None:
    secret = "wrong-" + uuid.uuid4().hex
    store = open_storage(s3_settings(s3_bucket, f"s3://{BUCKET}/denied", secret=secret))
    with pytest.raises(StorageError) as info:
        store.write_bytes("x.txt", b"x")
    message = str(info.value)
    assert f"s3://{BUCKET}/denied/x.txt" in message
    assert secret not in message and s3_bucket.secret_key not in message
    assert secret not in repr(store)


def test_marker_json_is_plain(tmp_path: Path) -> None:
    store = open_storage(Settings.load(storage={"root": str(tmp_path / "store")}))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hi")
    assert store.copy_tree(tmp_path / "src", "incoming/one", marker="DONE") == 1
    assert json.loads(store.read_bytes("incoming/one/DONE")) == {"files": 1, "bytes": 2}
