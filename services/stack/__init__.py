"""The local stack: the real services on loopback, started and stopped as one.

``diki stack up`` starts, in ``<stack home>``:

- ``s3``: SeaweedFS ``weed mini`` (credentials from settings, or generated once), with the bucket;
- ``mlflow``: an MLflow server (SQLite or the Postgres URL given, artifacts in the S3 bucket);
- ``prefect``: a Prefect server;
- ``ray``: a Ray head with its dashboard;
- then every extra service named in ``stack.extra_services``, and those the caller passes
  (``diki stack up`` passes :data:`STACK_SERVICES`: the Serve application and the served watcher).

Logs go to ``logs/<name>.log``, pid files to ``run/<name>.pid``, data to ``data/``, and
``stack.env`` (mode 0600) holds the variables that point a client at the stack. ``down`` stops
exactly the processes recorded in the pid files and leaves the data in place, so the next ``up``
finds it again.

Modules, one job each:

- :mod:`~services.stack.supervisor`: any long-running process: :class:`ServiceSpec`, start, health
  checks, pid files with start times, logs, stop, status (:class:`Supervisor`);
- :mod:`~services.stack.recipes`: how each core server is started (:class:`StackContext`, the
  :data:`ServiceFactory` of each);
- :mod:`~services.stack.product`: the product's own services (Serve, the watcher);
- :mod:`~services.stack.stack`: :class:`Stack`, the settings turned into services, the client
  environment and ``stack.env``.
"""

from services.stack.product import STACK_SERVICES, serve_service, watcher_service
from services.stack.recipes import (
    CORE_SERVICES,
    ServiceFactory,
    StackContext,
    default_ray_temp_dir,
    mlflow_service,
    prefect_service,
    ray_service,
    s3_service,
    weed_mini_command,
    weed_ports,
)
from services.stack.stack import Stack, UpResult
from services.stack.supervisor import (
    HOST,
    ServiceSpec,
    ServiceStatus,
    StackError,
    Supervisor,
    find_executable,
    port_is_free,
)

__all__ = [
    "CORE_SERVICES",
    "HOST",
    "STACK_SERVICES",
    "ServiceFactory",
    "ServiceSpec",
    "ServiceStatus",
    "Stack",
    "StackContext",
    "StackError",
    "Supervisor",
    "UpResult",
    "default_ray_temp_dir",
    "find_executable",
    "mlflow_service",
    "port_is_free",
    "prefect_service",
    "ray_service",
    "s3_service",
    "serve_service",
    "watcher_service",
    "weed_mini_command",
    "weed_ports",
]
