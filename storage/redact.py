"""Credentials out of every URL, path and ``pipe:`` command that leaves the process (stored, written, printed).

:func:`redact_url` is the one function for that. ``s3://KEY:SECRET@bucket/x.tar`` keeps its scheme, host and path
but not its user info (a secret may hold ``/``, as AWS secret keys do); query parameters that carry secrets
(pre-signed URLs: ``X-Amz-Signature``, ``X-Amz-Credential``, ``token``, ...) keep only their names; each URL of an
fsspec chain (``simplecache::s3://...``) is redacted alone. A ``pipe:COMMAND`` keeps its program name and the URLs
and tar paths it reads (redacted); every other argument (``-H "Authorization: Bearer ..."``, ``-u user:pass``,
``TOKEN=...``) becomes ``***``. A local path keeps everything but a ``user:secret@`` segment. The result is a
function of the input alone, so redacted fingerprints of one input compare equal across runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Iterable
from typing import Any

HIDDEN = "***"
SECRET_PARAMS = ("signature", "credential", "token", "secret", "password", "key", "sig", "auth", "session")
PIPE = "pipe:"  # WebDataset's URL for a shell command that writes a tar shard to stdout
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_PLAIN_USERINFO = re.compile(r"[^/?#\s]*@")  # RFC 3986 user info: up to the authority's last '@'
_SLASHED_USERINFO = re.compile(r"[^/:@\s]+:[^@\s]*?@")  # KEY:SECRET@ where SECRET holds '/' (not percent-encoded)
_HOST_PORT = re.compile(r"[^/:@\s]+:\d{1,5}(/|$)")
_PATH_USERINFO = re.compile(r"(^|/)[^/:@\s]+:[^/@\s]*@")  # a user:secret@ segment of a local path
_PROGRAM = re.compile(r"[\w./+-]+")


def _secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_PARAMS)


def _query(query: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***`` (the text of other parameters kept as written)."""
    pairs = [pair.partition("=") for pair in query.split("&")]
    return "&".join(f"{k}{eq}{HIDDEN}" if eq and _secret(k) else f"{k}{eq}{v}" for k, eq, v in pairs)


def _authority_userinfo(rest: str) -> re.Match | None:
    """The user info at the start of ``rest`` (a URL after ``scheme://``), or None."""
    plain = _PLAIN_USERINFO.match(rest)
    if plain or _HOST_PORT.match(rest):
        return plain
    return _SLASHED_USERINFO.match(rest)


def _one_url(url: str) -> str:
    """One URL or local path without user info and secret query values."""
    scheme = _SCHEME.match(url)
    head, rest = (url[: scheme.end()], url[scheme.end() :]) if scheme else ("", url)
    if scheme:
        userinfo = _authority_userinfo(rest)
        rest = f"{HIDDEN}@{rest[userinfo.end() :]}" if userinfo else rest
    else:
        rest = _PATH_USERINFO.sub(lambda m: f"{m.group(1)}{HIDDEN}@", rest)
    path, mark, query = rest.partition("?")
    if not mark:
        return head + rest
    query, hash_mark, fragment = query.partition("#")
    return f"{head}{path}?{_query(query)}{hash_mark}{fragment}"


def _is_location(word: str) -> bool:
    return bool(_SCHEME.match(word)) or word.split("?", 1)[0].lower().endswith(TAR_SUFFIXES)


def _words(command: str) -> list[str]:
    """Shell words of ``command``, a quoted word holding several (``sh -c "curl ..."``) split in turn."""
    out = []
    for word in shlex.split(command):
        out += _words(word) if len(word.split()) > 1 else [word]
    return out


def _command(command: str) -> str:
    """``curl -s -H "Authorization: Bearer T" https://u:p@host/x.tar`` -> ``curl *** https://***@host/x.tar``."""
    try:
        words = _words(command)
    except ValueError:
        return HIDDEN
    if not words:
        return command
    shown = [words[0] if _PROGRAM.fullmatch(words[0]) and not _is_location(words[0]) else HIDDEN]
    for word in words[1:]:
        if _is_location(word):
            shown.append(_one_url(word))
        elif shown[-1] != HIDDEN:
            shown.append(HIDDEN)
    return " ".join(shown)


def redact_url(url: str) -> str:
    """``url`` (a URL, an fsspec chain, a local path or a ``pipe:`` command) without the secrets it may carry."""
    if url.startswith(PIPE):
        return PIPE + _command(url[len(PIPE) :])
    return "::".join(_one_url(part) for part in url.split("::"))


def redact_fields(options: dict[str, Any], names: Collection[str]) -> dict[str, Any]:
    """``options`` (a config's record) with the URLs under ``names`` (a string or a list of them) redacted."""

    def shown(value: Any) -> Any:
        if isinstance(value, str):
            return redact_url(value)
        return [redact_url(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {k: shown(v) if k in names else v for k, v in options.items()}


def redact_in(text: str, urls: Iterable[str]) -> str:
    """``text`` (e.g. an exception's message) with each of ``urls`` in it redacted: as given or quoted by ``repr``,
    and a ``pipe:`` command also without its prefix (as the failed command is quoted)."""
    for url in urls:
        spellings = [url, url[len(PIPE) :]] if url.startswith(PIPE) else [url]
        for spelling in spellings:
            shown = redact_url(spelling) if spelling == url else _command(spelling)
            for form, form_shown in ((spelling, shown), (repr(spelling)[1:-1], repr(shown)[1:-1])):
                text = text.replace(form, form_shown)
    return text
