"""Online classification on Ray Serve: the app (``services.serving.app:build_app``) and its HTTP client.

Submodules: ``app`` (FastAPI ingress + Serve deployment), ``bundles`` (snapshots, loading, the
registry watcher), ``images`` (request image decoding with limits), ``schemas`` (API bodies),
``metrics`` (Prometheus), ``client`` (httpx client). Importing this package imports none of them,
so a client does not pay for Ray or torch.
"""
