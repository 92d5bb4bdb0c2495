"""The settings model: defaults, sources and their order, validation, masking, the `diki config show` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from services.settings import MASK, STANDARD_ENV, Settings, SettingsError, get_settings

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value-never-printed"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test starts in an empty folder with no settings in the environment."""
    for name in list(os.environ):
        if name.upper().startswith("DIKI_") or name in STANDARD_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def write_config(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_are_embedded_under_dot_diki_and_create_nothing(tmp_path: Path) -> None:
    s = Settings.load()
    home = tmp_path / ".diki"
    assert s.home == home
    assert s.storage.root == str(home / "storage")
    assert (s.storage.incoming_prefix, s.storage.quarantine_prefix) == ("incoming", "quarantine")
    assert s.mlflow.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert s.mlflow.artifact_location == str(home / "mlartifacts")
    assert s.mlflow.registry_model_name == "diki"
    assert s.ray.address is None
    assert (s.train.workers, s.train.use_gpu, s.train.batch_size, s.train.lr) == (1, False, 128, None)
    assert s.backbone.name == "diki-small"
    assert (s.serve.host, s.serve.port, s.serve.num_cpus, s.serve.api_key) == ("127.0.0.1", 8000, 0.5, None)
    assert s.pipeline.prefect_api_url is None
    assert s.stack.home == home / "stack"
    assert not home.exists()


def test_home_moves_every_derived_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKI_HOME", "data/state")
    s = Settings.load()
    assert s.storage.root == str(tmp_path / "data/state/storage")
    assert s.stack.home == tmp_path / "data/state/stack"


def test_nested_env_vars_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKI_TRAIN__WORKERS", "2")
    monkeypatch.setenv("diki_serve__port", "9001")
    monkeypatch.setenv("DIKI_STACK__PORTS__MLFLOW", "5055")
    monkeypatch.setenv("DIKI_STACK__EXTRA_SERVICES", '["pkg.mod:factory"]')
    s = Settings.load()
    assert s.train.workers == 2
    assert s.serve.port == 9001
    assert s.stack.ports.mlflow == 5055
    assert s.stack.extra_services == ["pkg.mod:factory"]


def test_standard_env_vars_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    s = Settings.load()
    assert isinstance(s.s3.secret_access_key, SecretStr)
    assert s.s3.secret_access_key.get_secret_value() == SECRET
    assert s.s3.access_key_id is not None and s.s3.access_key_id.get_secret_value() == "AKIAEXAMPLE"
    assert (s.s3.endpoint_url, s.s3.region) == ("http://127.0.0.1:8333", "eu-west-1")
    assert s.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert s.mlflow.artifact_location is None, "a tracking server decides where artifacts go"
    assert s.pipeline.prefect_api_url == "http://127.0.0.1:4200/api"
    assert s.ray.address == "127.0.0.1:6379"


def test_specific_names_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2222")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("DIKI_S3__REGION", "us-west-2")
    s = Settings.load()
    assert s.s3.endpoint_url == "http://127.0.0.1:2222"
    assert s.s3.region == "us-west-2"


def test_config_file_sits_between_env_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(
        tmp_path / "diki.yaml", {"train": {"workers": 3, "epochs": 7}, "storage": {"root": "s3://bucket/pre"}}
    )
    monkeypatch.setenv("DIKI_CONFIG", str(config))
    monkeypatch.setenv("DIKI_TRAIN__WORKERS", "4")
    s = Settings.load()
    assert (s.train.workers, s.train.epochs) == (4, 7)
    assert s.storage.root == "s3://bucket/pre" and s.storage.is_s3
    # An explicit path wins over DIKI_CONFIG, overrides win over everything.
    other = write_config(tmp_path / "other.yaml", {"train": {"epochs": 2}})
    assert Settings.load(other).train.epochs == 2
    assert Settings.load(other, train={"epochs": 9}).train.epochs == 9


def test_config_file_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKI_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match=r"missing\.yaml \(from DIKI_CONFIG\) does not exist"):
        Settings.load()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  workers: [1,\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"bad\.yaml is not valid YAML at line"):
        Settings.load(bad)
    with pytest.raises(SettingsError, match="must hold a mapping"):
        Settings.load(write_config(tmp_path / "list.yaml", [1, 2]))
    with pytest.raises(SettingsError, match=r"train\.workrs: Extra inputs are not permitted"):
        Settings.load(write_config(tmp_path / "typo.yaml", {"train": {"workrs": 2}}))


def test_invalid_values_name_setting_and_variable_but_not_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKI_TRAIN__WORKERS", "0")
    monkeypatch.setenv("DIKI_S3__ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:8333")
    with pytest.raises(SettingsError) as info:
        Settings.load()
    message = str(info.value)
    assert "train.workers" in message and "DIKI_TRAIN__WORKERS" in message
    assert "s3.endpoint_url" in message and "must not carry credentials" in message
    assert SECRET not in message


def test_unknown_diki_sections_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKI_SOME_TOOL_DIR", "/x")  # not nested: another tool's variable, left alone
    assert Settings.load().train.workers == 1
    monkeypatch.setenv("DIKI_TRIAN__WORKERS", "2")
    with pytest.raises(SettingsError, match="DIKI_TRIAN__WORKERS"):
        Settings.load()


@pytest.mark.parametrize(
    ("root", "error"),
    [
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "prefix segment"),
        ("gs://bucket/x", "local path or s3://"),
        ("", "must not be empty"),
    ],
)
def test_storage_root_is_validated(root: str, error: str) -> None:
    with pytest.raises(SettingsError, match=error):
        Settings.load(storage={"root": root})


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    s = Settings.load(
        storage={"root": "data/store"}, mlflow={"tracking_uri": "sqlite:///x/m.db", "artifact_location": "arts"}
    )
    assert s.storage.root == str(tmp_path / "data/store")
    assert s.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'x/m.db'}"
    assert s.mlflow.artifact_location == str(tmp_path / "arts")


def test_other_validation() -> None:
    with pytest.raises(SettingsError, match="given together"):
        Settings.load(s3={"access_key_id": "a"})
    with pytest.raises(SettingsError, match="ray.address"):
        Settings.load(ray={"address": "not an address"})
    with pytest.raises(SettingsError, match="both 7000"):
        Settings.load(stack={"ports": {"mlflow": 7000, "prefect": 7000}})
    with pytest.raises(SettingsError, match="gives to its workers"):
        Settings.load(stack={"ports": {"mlflow": 12000}})
    with pytest.raises(SettingsError, match="registry_model_name"):
        Settings.load(mlflow={"registry_model_name": "../evil"})
    with pytest.raises(SettingsError, match="extra_services"):
        Settings.load(stack={"extra_services": ["no colon"]})
    with pytest.raises(SettingsError, match="max_task_drop"):
        Settings.load(promotion={"max_task_drop": 2})


def test_secrets_are_masked_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("DIKI_SERVE__API_KEY", SECRET)
    monkeypatch.setenv("DIKI_STACK__MLFLOW_BACKEND_STORE_URI", f"postgresql://mlflow:{SECRET}@db:5432/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{SECRET}@db:5432/mlflow")
    s = Settings.load()
    masked = s.masked_dict()
    assert masked["s3"]["secret_access_key"] == MASK
    assert masked["s3"]["access_key_id"] == MASK
    assert masked["s3"]["session_token"] is None
    assert masked["serve"]["api_key"] == MASK
    assert masked["stack"]["mlflow_backend_store_uri"] == MASK
    assert masked["mlflow"]["tracking_uri"] == f"postgresql://mlflow:{MASK}@db:5432/mlflow"
    for text in (yaml.safe_dump(masked), repr(s), str(s)):
        assert SECRET not in text


def test_get_settings_is_cached_and_cache_clear_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("DIKI_CONFIG", str(write_config(tmp_path / "c.yaml", {"train": {"epochs": 3}})))
    assert get_settings() is first  # cached: the new file is not read yet
    get_settings.cache_clear()
    assert get_settings().train.epochs == 3


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import os, sys; before = dict(os.environ); sys.path.insert(0, sys.argv[1]);"
        "import services.settings, services.storage, services.stack, pipelines.cli.config, pipelines.cli.stack;"
        "assert dict(os.environ) == before, 'environment changed';"
        "assert os.listdir('.') == [], os.listdir('.')"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, check=True, timeout=60)


def test_config_show_prints_yaml_with_secrets_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import app

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    config = write_config(tmp_path / "diki.yaml", {"serve": {"port": 8123}})
    result = CliRunner().invoke(app, ["config", "show", "--config", str(config)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["serve"]["port"] == 8123
    assert shown["s3"]["secret_access_key"] == MASK
    assert SECRET not in result.output

    monkeypatch.setenv("DIKI_TRAIN__WORKERS", "zero")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "train.workers" in result.output
