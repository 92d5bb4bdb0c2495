"""Online classification on Ray Serve: the app (``services.serving.app:build_app``) and its HTTP client.

Submodules: ``app`` (the routes, the Serve deployment and ``build_app``), ``config`` (the app's
arguments, the settings and the resolved replica config), ``requests`` (API key, request parsing
and checks, image preprocessing), ``bundles`` (snapshots, loading, the registry watcher, hot swap
with its polling thread), ``images`` (request image decoding with limits), ``schemas`` (API
bodies), ``metrics`` (Prometheus, the request-metrics middleware), ``client`` (httpx client).
Importing this package imports none of them, so a client does not pay for Ray or torch.
"""
