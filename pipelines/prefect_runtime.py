"""The one place that sets up Prefect for this process: an ephemeral API (embedded mode) or a server.

Prefect reads its settings from the environment when it is first imported, so :func:`configure_prefect`
must run before anything imports ``prefect`` (the CLI commands and ``python -m pipelines.watcher`` call
it first). It sets:

- ``PREFECT_API_URL`` to ``settings.pipeline.prefect_api_url`` when one is configured (a server, with
  its UI); without one, Prefect runs an ephemeral API in a subprocess (first run 7-12 s);
- ``PREFECT_HOME`` to ``<home>/prefect`` unless set, so the ephemeral API keeps its database with the
  rest of the embedded state;
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` and ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90``
  unless set (telemetry errors and a too-short start-up timeout on a busy two-core machine otherwise).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Final

from services.settings import Settings

__all__ = [
    "PREFECT_DEFAULTS",
    "PrefectMode",
    "PrefectUnavailable",
    "configure_prefect",
    "prefect_environment",
    "prefect_ui_url",
    "require_server",
]

PREFECT_DEFAULTS: Final[dict[str, str]] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


class PrefectUnavailable(RuntimeError):
    """The configured Prefect server cannot be used; the message says which URL and why."""


@dataclass(frozen=True)
class PrefectMode:
    """How this process talks to Prefect."""

    api_url: str | None  # None: an ephemeral API started on demand inside this process's session
    home: str

    @property
    def ephemeral(self) -> bool:
        return self.api_url is None

    @property
    def ui_url(self) -> str | None:
        return _ui(self.api_url)

    def describe(self) -> str:
        if self.api_url is None:
            return f"ephemeral Prefect API (no server; state in {self.home})"
        return f"Prefect server {self.api_url} (UI {self.ui_url})"


def _ui(api_url: str | None) -> str | None:
    if api_url is None:
        return None
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url


def prefect_environment(settings: Settings) -> dict[str, str]:
    """The Prefect variables a process running the flows needs (existing variables not consulted)."""
    env = dict(PREFECT_DEFAULTS)
    env["PREFECT_HOME"] = str(settings.home / "prefect")
    if settings.pipeline.prefect_api_url:
        env["PREFECT_API_URL"] = settings.pipeline.prefect_api_url
    return env


def prefect_ui_url(settings: Settings) -> str | None:
    """The Prefect UI of the configured server, or None in embedded (ephemeral) mode."""
    return _ui(settings.pipeline.prefect_api_url)


def configure_prefect(settings: Settings) -> PrefectMode:
    """Point this process's Prefect at the configured API (see the module docstring) and return the mode.

    Variables already set win, except ``PREFECT_API_URL``, which follows the settings (which read
    ``PREFECT_API_URL`` themselves). If Prefect was imported already, its global settings are
    refreshed when a variable changed.
    """
    wanted = prefect_environment(settings)
    changed = False
    for key, value in wanted.items():
        if key == "PREFECT_API_URL":
            if os.environ.get(key) != value:
                os.environ[key] = value
                changed = True
        elif key not in os.environ:
            os.environ[key] = value
            changed = True
    if changed and "prefect.context" in sys.modules:
        import prefect.context

        prefect.context.refresh_global_settings_context()
    return PrefectMode(api_url=settings.pipeline.prefect_api_url, home=os.environ["PREFECT_HOME"])


def require_server(settings: Settings, timeout_s: float = 5.0) -> str:
    """The configured Prefect server's API URL, after checking it answers; else PrefectUnavailable.

    Schedules and ``serve()`` need a running server: an ephemeral API has no scheduler.
    """
    import httpx

    url = settings.pipeline.prefect_api_url
    if not url:
        raise PrefectUnavailable(
            "no Prefect server is configured (pipeline.prefect_api_url / PREFECT_API_URL): a served deployment "
            "with a schedule needs one; in embedded mode run `diki watch` instead"
        )
    try:
        response = httpx.get(f"{url}/health", timeout=timeout_s)
    except httpx.TransportError as exc:
        raise PrefectUnavailable(f"the Prefect server at {url} cannot be reached: {exc!r}") from None
    if not response.is_success:
        raise PrefectUnavailable(f"the Prefect server at {url} answered {response.status_code} to /health")
    return url
