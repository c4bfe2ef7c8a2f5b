"""Credentials out of URLs before they are stored in a cache or printed.

``s3://KEY:SECRET@bucket/x.tar`` keeps its scheme, host and path but not its user info, and query parameters
that carry secrets (pre-signed URLs: ``X-Amz-Signature``, ``X-Amz-Credential``, ``token``, ...) keep only their
names. Plain paths pass through unchanged.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
SECRET_PARAMS = ("signature", "credential", "token", "secret", "password", "key", "sig")


def _secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_PARAMS)


def redact_url(url: str) -> str:
    """``url`` without passwords/keys in its user info and without secret query values."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if "@" not in parts.netloc and not any(_secret(k) for k, _ in pairs):
        return url
    netloc = f"{HIDDEN}@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, HIDDEN if _secret(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
