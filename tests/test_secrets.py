"""Secrets stay secret: ``redact_url`` on every shape of URL and command, and no credential in anything a whole
extract -> train -> eval -> embed -> info -> verify -> islands session writes or prints."""

from __future__ import annotations

import pytest

from apmpipe.storage.redact import redact_url

SECRET = "wJal/K7MDENG+bPxRfiCY"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/t.tar", "s3://***@bucket/t.tar"),
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/dir/t.tar", "s3://***@bucket/dir/t.tar"),
        ("s3://AKIAEXAMPLE:plain@bucket/t.tar", "s3://***@bucket/t.tar"),
        ("s3://AKIAEXAMPLE@bucket/t.tar", "s3://***@bucket/t.tar"),
        ("https://user:p@ss@host/x.tar", "https://***@host/x.tar"),
        (f"simplecache::s3://K:{SECRET}@bucket/t.tar", "simplecache::s3://***@bucket/t.tar"),
        (
            "https://host/x.tar?X-Amz-Credential=AK&X-Amz-Signature=abc&v=1#frag",
            "https://host/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&v=1#frag",
        ),
        ("https://host/x.tar?access_token=abc&sig=d&auth=e", "https://host/x.tar?access_token=***&sig=***&auth=***"),
        ("/data/user:secret@host/c.zarr", "/data/***@host/c.zarr"),
        ("user:secret@host/c.zarr", "***@host/c.zarr"),
    ],
)
def test_redact_hides_userinfo_and_secret_parameters(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "/data/cache.zarr",
        "relative/shards/train-0000.tar",
        "s3://bucket/images@2x/t.tar",  # '@' in a path is no user info
        "http://127.0.0.1:9000/bucket/a@b/t.tar",  # nor after host:port
        "https://host/x.tar?version=3",
        "gs://bucket/c.zarr",
        "file:///abs/c.zarr",
    ],
)
def test_redact_keeps_urls_without_secrets(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("pipe:cat /data/train-0000.tar", "pipe:cat /data/train-0000.tar"),
        (
            'pipe:curl -s -H "Authorization: Bearer eyJhbGci.eyJzdWIi.SflKxw" https://host/train-0000.tar',
            "pipe:curl *** https://host/train-0000.tar",
        ),
        ("pipe:curl -s https://user:pass@host/x.tar", "pipe:curl *** https://***@host/x.tar"),
        ("pipe:curl -u user:pass https://host/x.tar", "pipe:curl *** https://host/x.tar"),
        ("pipe:curl --oauth2-bearer=TOKEN https://host/x.tar?token=T", "pipe:curl *** https://host/x.tar?token=***"),
        (f"pipe:aws s3 cp s3://AK:{SECRET}@bucket/x.tar -", "pipe:aws *** s3://***@bucket/x.tar ***"),
        ("pipe:TOKEN=abc curl https://host/x.tar", "pipe:*** https://host/x.tar"),
        ("pipe:sh -c 'curl -H \"X-Api-Key: K\" https://host/x.tar'", "pipe:sh *** https://host/x.tar"),
        ('pipe:curl "unterminated', "pipe:***"),
    ],
)
def test_redact_pipe_commands_keeps_program_and_locations(command: str, shown: str) -> None:
    assert redact_url(command) == shown


def test_redact_is_stable_so_stored_fingerprints_compare_equal() -> None:
    """A rerun with a rotated token redacts to what the first run stored (its shards are recognised)."""
    first = redact_url('pipe:curl -H "Authorization: Bearer OLD" https://host/x.tar')
    assert first == redact_url('pipe:curl -H "Authorization: Bearer NEW" https://host/x.tar')
    assert redact_url(first) == first
