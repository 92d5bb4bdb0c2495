"""The one settings model of the project.

Values come from, highest priority first:

1. keyword overrides given to :meth:`Settings.load` (what a CLI flag sets);
2. ``DIKI_*`` environment variables, nested with ``__`` (``DIKI_TRAIN__WORKERS=2``);
3. the standard variables other tools read too: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
   ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_REGION`` (or
   ``AWS_DEFAULT_REGION``), ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL`` and ``RAY_ADDRESS``;
4. a YAML file named by ``DIKI_CONFIG`` (or ``--config``), laid out like :meth:`Settings.masked_dict`;
5. the embedded-mode defaults: everything lives under the home folder ``.diki/`` of the working
   directory (object storage in ``.diki/storage``, MLflow in ``.diki/mlflow.db`` and
   ``.diki/mlartifacts``, the local stack in ``.diki/stack``), Prefect runs ephemeral, Ray runs in
   the process, Serve listens on 127.0.0.1:8000.

Relative paths are made absolute against the working directory when settings load, so Ray workers
(which run elsewhere) see the same folders. Loading touches nothing: no folder is created and no
environment variable is set.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "MASK",
    "BackboneSettings",
    "MlflowSettings",
    "PipelineSettings",
    "PromotionSettings",
    "RaySettings",
    "S3Settings",
    "ServeSettings",
    "Settings",
    "SettingsError",
    "StackPorts",
    "StackSettings",
    "StorageSettings",
    "TrainSettings",
    "get_settings",
    "split_s3_uri",
]

ENV_PREFIX: Final = "DIKI_"
CONFIG_ENV: Final = "DIKI_CONFIG"
MASK: Final = "********"

# Standard variable -> settings location. Where two name the same setting, the first one set wins.
STANDARD_ENV: Final[dict[str, tuple[str, str]]] = {
    "AWS_ACCESS_KEY_ID": ("s3", "access_key_id"),
    "AWS_SECRET_ACCESS_KEY": ("s3", "secret_access_key"),
    "AWS_SESSION_TOKEN": ("s3", "session_token"),
    "AWS_ENDPOINT_URL_S3": ("s3", "endpoint_url"),
    "AWS_ENDPOINT_URL": ("s3", "endpoint_url"),
    "AWS_REGION": ("s3", "region"),
    "AWS_DEFAULT_REGION": ("s3", "region"),
    "MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"),
    "PREFECT_API_URL": ("pipeline", "prefect_api_url"),
    "RAY_ADDRESS": ("ray", "address"),
}

NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MODEL_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,254}$")
RAY_ADDRESS_RE: Final = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.-]+:\d{1,5})$")
HOOK_RE: Final = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# `ray start` hands these to its workers by default; a stack port inside would collide.
RAY_WORKER_PORTS: Final = range(10002, 20000)


class SettingsError(ValueError):
    """Settings that cannot be loaded: names each bad setting and where it came from, never its value."""


class _Section(BaseModel):
    """A settings section: unknown keys are errors, and passwords inside URLs never show in its repr."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, _mask_url(value) if isinstance(value, str) else value


def _check_http_url(value: str | None, what: str) -> str | None:
    """Accept ``http(s)://host[:port][/path]`` without credentials in it."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8333")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials; give them through their own settings")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise ValueError(f"{what} has an invalid port") from exc
    return value.rstrip("/")


def _check_name(value: str, what: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match {pattern.pattern}")
    return value


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``, validating the bucket and each prefix segment."""
    if not _is_s3(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"bucket {bucket!r} in {uri!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
    segments = [s for s in prefix.split("/")] if prefix else []
    for segment in segments:
        if segment in ("", ".", "..") or not PREFIX_SEGMENT_RE.fullmatch(segment):
            raise ValueError(f"prefix segment {segment!r} in {uri!r} is not allowed")
    return bucket, "/".join(segments)


def _mask_url(value: str) -> str:
    """Replace the password of a URL (``scheme://user:pass@host``) with the mask."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.password:
        return value
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StorageSettings(_Section):
    """Where datasets arrive and artifacts are kept: a local folder or ``s3://bucket/prefix``."""

    # None: <home>/storage. A relative local path is taken from the working directory.
    root: str | None = None
    # Producers copy each labelled dataset to <root>/<incoming_prefix>/<name>/ and write the marker last.
    incoming_prefix: str = "incoming"
    # Datasets that failed validation are moved here, with a report beside them.
    quarantine_prefix: str = "quarantine"
    # Trained task artifacts and run records.
    artifacts_prefix: str = "artifacts"
    # A dataset (the project's format, any labels) of the images the model must not disturb: the
    # likelihood-ratio gate's reference density is fitted on it when it appears or changes, and
    # used from the next bundle on. Without one, a shipped backbone's own reference is used.
    reference_prefix: str = "reference"
    # Name of the file that marks a dataset folder as complete.
    success_marker: str = "_SUCCESS"

    @field_validator("root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError("storage.root must not be empty")
        if _is_s3(value):
            bucket, prefix = split_s3_uri(value)
            return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        if "://" in value:
            raise ValueError("storage.root must be a local path or s3://bucket/prefix")
        return str(_absolute(Path(value)))

    @field_validator("incoming_prefix", "quarantine_prefix", "artifacts_prefix", "reference_prefix", "success_marker")
    @classmethod
    def _names(cls, value: str, info: Any) -> str:
        return _check_name(value, f"storage.{info.field_name}", re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"))

    @property
    def is_s3(self) -> bool:
        return self.root is not None and _is_s3(self.root)


class S3Settings(_Section):
    """The S3 endpoint and credentials. Empty credentials mean the default AWS credential chain."""

    # None: the AWS endpoint of the region. For SeaweedFS or MinIO: http://host:port.
    endpoint_url: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    region: str = "us-east-1"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _check_http_url(value or None, "s3.endpoint_url")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _check_name(value, "s3.region", re.compile(r"^[a-z0-9-]{1,32}$"))

    @model_validator(mode="after")
    def _pair(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("s3.access_key_id and s3.secret_access_key must be given together")
        return self


class MlflowSettings(_Section):
    """Experiment tracking and the model registry."""

    # None: sqlite:///<home>/mlflow.db. Or http(s)://host:port of an MLflow server.
    tracking_uri: str | None = None
    registry_model_name: str = "diki"
    experiment_name: str = "diki"
    # None: <home>/mlartifacts for a local tracking store; the server's own setting for a server.
    artifact_location: str | None = None

    @field_validator("registry_model_name", "experiment_name")
    @classmethod
    def _model_name(cls, value: str, info: Any) -> str:
        return _check_name(value, f"mlflow.{info.field_name}", MODEL_NAME_RE)

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri is not None and self.tracking_uri.startswith(("http://", "https://"))


class RaySettings(_Section):
    """The Ray cluster. ``address=None`` starts Ray inside the process."""

    address: str | None = None
    # Logical CPUs of the in-process Ray or of the stack's head node; None: what Ray detects.
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "diki"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not RAY_ADDRESS_RE.fullmatch(value):
            raise ValueError("ray.address must be 'auto', 'host:port' or 'ray://host:port'")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _check_name(value, "ray.namespace")


class TrainSettings(_Section):
    """How Ray Train fits each task's adapters."""

    workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=10, ge=1)
    # SGD with a cosine schedule; DIKI's residual branches want a large rate. None: the backbone's
    # measured rate (diki_model.adapter_lr: 50 for the shipped diki-small), else the authors' 5.
    lr: float | None = Field(default=None, gt=0)
    seed: int = 0


class BackboneSettings(_Section):
    """The frozen CLIP that every task adapts."""

    # A model config name known to diki_model (the package ships diki-small with its weights).
    name: str = "diki-small"
    # None: the checkpoint shipped for `name`. Else a pretrained tag or a path to weights.
    pretrained: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "backbone.name", MODEL_NAME_RE)


class ServeSettings(_Section):
    """The Ray Serve deployment that answers classification requests."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    # A replica takes a whole CPU by default, which on a small machine starves training.
    num_cpus: float = Field(default=0.5, gt=0)
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    # None: no authentication. Else every request must carry it (X-API-Key header or a bearer token).
    api_key: SecretStr | None = None
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_labels: int = Field(default=512, ge=1)
    # How often replicas look for a newly promoted model version.
    poll_interval_s: float = Field(default=10.0, gt=0)
    # The admin routes (POST /v1/admin/reload) never open by default: they need this key (header
    # X-Admin-Key). None: the key kept in `admin_key_file`, which `diki serve` (and so the local
    # stack) generates on first start with owner-only permissions.
    admin_key: SecretStr | None = None
    # None: <home>/serve/admin.key.
    admin_key_file: Path | None = None
    # Development only: admin routes answer without a key.
    admin_open: bool = False
    # The most bytes a request body may hold, whatever the images and batch limits would allow;
    # checked from Content-Length and while reading, before the body is held whole.
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_name(value, "serve.host", re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$"))

    @field_validator("admin_key_file")
    @classmethod
    def _admin_key_file(cls, value: Path | None) -> Path | None:
        return _absolute(value) if value is not None else None


class PipelineSettings(_Section):
    """The Prefect flows that watch for datasets and drive training and promotion."""

    # How often the watcher lists the incoming prefix.
    poll_interval_s: float = Field(default=30.0, gt=0)
    # None: an ephemeral Prefect API inside the process.
    prefect_api_url: str | None = None
    work_pool: str = "diki"

    @field_validator("prefect_api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        return _check_http_url(value or None, "pipeline.prefect_api_url")

    @field_validator("work_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        return _check_name(value, "pipeline.work_pool")


class PromotionSettings(_Section):
    """What a new task must show before it joins a bundle, and a new version before it replaces the served one."""

    # Largest accuracy drop (absolute, 0-1) allowed on any earlier task.
    max_task_drop: float = Field(default=0.02, ge=0, le=1)
    # Smallest share of the backbone's zero-shot accuracy that must be kept (0-1).
    min_zero_shot_retention: float = Field(default=0.95, ge=0, le=1)
    # A task must earn its place: on its validation split, its branch must beat zero-shot by at least
    # this much (absolute, 0-1) and by `learned_z_gain` standard errors of the difference, and chance by
    # `learned_z_chance` binomial standard errors (see diki_model.probe). False turns the check off.
    require_learned: bool = True
    min_learned_gain: float = Field(default=0.02, ge=0, le=1)
    learned_z_gain: float = Field(default=2.0, ge=0, le=10)
    learned_z_chance: float = Field(default=3.0, ge=0, le=10)
    # The new version's new task must beat zero-shot on its own test split to become production.
    require_new_task_gain: bool = True


class StackPorts(_Section):
    """Loopback ports of the local stack (``diki stack up``)."""

    s3: int = 8333
    s3_grpc: int = 28333
    master: int = 9333
    master_grpc: int = 29333
    volume: int = 9340
    volume_grpc: int = 29340
    filer: int = 8888
    filer_grpc: int = 28888
    admin: int = 23646
    admin_grpc: int = 33646
    mlflow: int = 5000
    prefect: int = 4200
    ray: int = 6379
    ray_dashboard: int = 8265
    ray_client: int = 10001
    ray_dashboard_agent: int = 52365

    @model_validator(mode="after")
    def _ports(self) -> StackPorts:
        seen: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if not 1 <= port <= 65535:
                raise ValueError(f"stack.ports.{name}={port} is not a TCP port")
            if port in RAY_WORKER_PORTS:
                raise ValueError(
                    f"stack.ports.{name}={port} lies in {RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}, "
                    "which the Ray head gives to its workers"
                )
            if port in seen:
                raise ValueError(f"stack.ports.{name} and stack.ports.{seen[port]} are both {port}")
            seen[port] = name
        return self


class StackSettings(_Section):
    """The local stack of real services on loopback: S3, MLflow, Prefect, a Ray head, and hooks."""

    # None: <home>/stack. Holds data/, logs/, run/ (pid files) and stack.env.
    home: Path | None = None
    # The bucket created on the stack's S3 server; storage goes to s3://<bucket>/storage.
    bucket: str = "diki"
    # None: SQLite in the stack's data folder. Else e.g. postgresql://user:password@host:5432/mlflow.
    mlflow_backend_store_uri: SecretStr | None = None
    # Ray's session folder (sockets live there, so the path must stay short). None: /tmp/diki-ray-<id>.
    ray_temp_dir: Path | None = None
    # Extra services as "module:function" import paths (see services.stack.ServiceFactory).
    extra_services: list[str] = Field(default_factory=list)
    ports: StackPorts = Field(default_factory=StackPorts)
    start_timeout_s: float = Field(default=120.0, gt=0)
    stop_timeout_s: float = Field(default=45.0, gt=0)
    # Each service's log (logs/<name>.log) is rotated when it reaches log_max_bytes; log_backups
    # older files are kept (<name>.log.1 is the newest of them).
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)
    log_backups: int = Field(default=3, ge=0, le=100)
    # Ray's token authentication on the stack's Ray head (Ray >= 2.52): jobs, Ray Client and the
    # dashboard API then need the token kept in <stack home>/ray-auth-token. Off by default.
    ray_token_auth: bool = False

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        split_s3_uri(f"s3://{value}")
        return value

    @field_validator("extra_services")
    @classmethod
    def _hooks(cls, value: list[str]) -> list[str]:
        for hook in value:
            _check_name(hook, "stack.extra_services entry", HOOK_RE)
        return value


class _StandardEnvSource(PydanticBaseSettingsSource):
    """Reads the standard variables of AWS, MLflow, Prefect and Ray into their settings."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, dict[str, str]] = {}
        for env_name, (section, key) in STANDARD_ENV.items():
            value = os.environ.get(env_name)
            if value and key not in data.get(section, {}):
                data.setdefault(section, {})[key] = value
        return data


class _MappingSource(PydanticBaseSettingsSource):
    """A fixed mapping, e.g. the contents of the YAML config file."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


_FILE_DATA: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "diki_settings_file", default=None
)


class Settings(BaseSettings):
    """Every setting of the project. Load with :func:`get_settings` or :meth:`Settings.load`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        env_ignore_empty=True,
        extra="forbid",
        validate_default=True,
    )

    # Root of everything embedded mode keeps on disk.
    home: Path = Path(".diki")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    backbone: BackboneSettings = Field(default_factory=BackboneSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    stack: StackSettings = Field(default_factory=StackSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _StandardEnvSource(settings_cls),
            _MappingSource(settings_cls, _FILE_DATA.get() or {}),
        )

    @field_validator("home")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return _absolute(value)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        """Fill the defaults that live under ``home`` and make local paths absolute."""
        home = self.home
        if self.storage.root is None:
            self.storage.root = str(home / "storage")
        mlflow = self.mlflow
        if mlflow.tracking_uri is None:
            mlflow.tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
        elif mlflow.tracking_uri.startswith("sqlite:///") and not mlflow.tracking_uri.startswith("sqlite:////"):
            mlflow.tracking_uri = f"sqlite:///{_absolute(Path(mlflow.tracking_uri[len('sqlite:///') :]))}"
        elif mlflow.tracking_uri.startswith(("http://", "https://")):
            _check_http_url(mlflow.tracking_uri, "mlflow.tracking_uri")
        if mlflow.artifact_location is None:
            if not mlflow.is_remote:
                mlflow.artifact_location = str(home / "mlartifacts")
        elif "://" not in mlflow.artifact_location:
            mlflow.artifact_location = str(_absolute(Path(mlflow.artifact_location)))
        stack = self.stack
        stack.home = _absolute(stack.home) if stack.home is not None else home / "stack"
        if stack.ray_temp_dir is not None:
            stack.ray_temp_dir = _absolute(stack.ray_temp_dir)
        return self

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Load settings from overrides, the environment, the config file and the defaults.

        Args:
            config_file: a YAML file; None reads the path from ``DIKI_CONFIG`` when that is set.
            overrides: top-level fields (sections as dicts) that win over every other source.

        Raises:
            SettingsError: naming each invalid setting and the sources consulted; values are never shown.
        """
        source = "argument"
        if config_file is None and os.environ.get(CONFIG_ENV):
            config_file, source = os.environ[CONFIG_ENV], CONFIG_ENV
        data = _read_config_file(Path(config_file), source) if config_file is not None else {}
        _check_env_names()
        token = _FILE_DATA.set(data)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, config_file)) from None
        finally:
            _FILE_DATA.reset(token)

    def masked_dict(self) -> dict[str, Any]:
        """All settings as plain data (YAML/JSON-ready) with every secret replaced by ``********``."""
        return _masked(self)


def _read_config_file(path: Path, source: str) -> dict[str, Any]:
    where = f"config file {path}" + (f" (from {CONFIG_ENV})" if source == CONFIG_ENV else "")
    if not path.is_file():
        raise SettingsError(f"{where} does not exist or is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SettingsError(f"{where} is not valid YAML{at}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where} cannot be read: {exc.__class__.__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"{where} must hold a mapping of sections (storage:, train:, ...), not {type(data).__name__}"
        )
    return data


def _check_env_names() -> None:
    """Reject nested ``DIKI_<SECTION>__*`` variables whose section does not exist, so a typo does not pass
    silently. (Unknown keys inside a known section are rejected by the model itself.)"""
    sections = set(Settings.model_fields)
    unknown = []
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or "__" not in upper:
            continue
        first = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in sections:
            unknown.append(name)
    if unknown:
        raise SettingsError(
            f"unknown settings in the environment: {', '.join(sorted(unknown))}; "
            f"{ENV_PREFIX}* names start with one of {', '.join(sorted(s.upper() for s in sections))}"
        )


def _describe(exc: ValidationError, config_file: str | Path | None) -> str:
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"  {loc}: {message} (env {env_name})")
    sources = f"{ENV_PREFIX}* and standard environment variables" + (
        f", config file {config_file}" if config_file else ""
    )
    return f"invalid settings (from {sources}):\n" + "\n".join(lines)


def _masked(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        out[name] = _masked_value(getattr(model, name))
    return out


def _masked_value(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else None
    if isinstance(value, BaseModel):
        return _masked(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, list | tuple):
        return [_masked_value(item) for item in value]
    return value


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings (``DIKI_CONFIG``, then the environment), loaded once.

    Call ``get_settings.cache_clear()`` to reload; a command given ``--config`` loads that file itself.
    """
    return Settings.load(None)
