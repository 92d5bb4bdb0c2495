"""Offline domains in the dataset format: pre-training, the continual stream, and held-out domains."""

from diki_model.datasets.domains import (
    DEFAULT_STREAM,
    DOMAINS,
    ROLES,
    STREAM_ORDERS,
    DomainSpec,
    build_all,
    build_domain,
    domains_with_role,
    generate_split,
    get_domain,
)
from diki_model.datasets.sources import MissingSourceError

__all__ = [
    "DEFAULT_STREAM",
    "DOMAINS",
    "ROLES",
    "STREAM_ORDERS",
    "DomainSpec",
    "MissingSourceError",
    "build_all",
    "build_domain",
    "domains_with_role",
    "generate_split",
    "get_domain",
]
