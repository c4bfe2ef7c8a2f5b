"""fsspec storage options as users give them, routed to where each filesystem expects them."""

from __future__ import annotations

from typing import Any


def route_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``endpoint_url`` moved where s3fs reads it (``client_kwargs``); other keys unchanged.

    Users name an S3-compatible server (MinIO, moto) as ``endpoint_url=http://...``, as boto does; s3fs takes
    it inside ``client_kwargs``.
    """
    routed = dict(options)
    if "endpoint_url" in routed:
        routed["client_kwargs"] = {**routed.get("client_kwargs", {}), "endpoint_url": routed.pop("endpoint_url")}
    return routed
