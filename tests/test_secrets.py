"""Secrets stay secret: ``redact_url`` on every shape of URL and command, and no credential in anything a whole
extract -> train -> eval -> embed -> info -> verify -> islands session writes or prints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apmpipe.storage.redact import redact_in, redact_url

from .conftest import FAST, TINY_VIT, TRAIN_FAST, run_main
from .test_scale import s3_endpoint  # noqa: F401 (the moto S3 server fixture)

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


def test_shards_recorded_by_an_older_redaction_still_count_as_done() -> None:
    from apmpipe.storage.sources import ShardSource, done_shards

    command = 'pipe:curl -H "Authorization: Bearer T0KEN" https://host/x.tar'
    shard = ShardSource(name="x", url=command)
    assert done_shards([shard], {"x": command}, "cache") == {"x"}  # stored whole before pipe: was redacted


def test_redact_in_hides_a_failed_command_quoted_in_an_error() -> None:
    command = 'pipe:curl -H "Authorization: Bearer T0KEN" https://host/x.tar'
    error = f"IOError: ({command[5:]!r}, {{'shell': True}}): exit 22; while reading {command}"
    shown = redact_in(error, [command])
    assert "T0KEN" not in shown and "curl *** https://host/x.tar" in shown and shown.startswith("IOError: (")


# -- a whole session on inputs and caches named with credentials ---------------------------------------------
TOKEN = "tok-S3CR3T-e2e"


def _leaks(text: str) -> bool:
    """Whether ``text`` shows the token, also where a terminal table folded it over two lines."""
    folded = re.sub(r"[\s\u2500-\u257f|]", "", text)
    return TOKEN in text or TOKEN in folded


def _written_with_token(root: Path) -> list[str]:
    """Files under ``root`` that hold the token: raw bytes, and parquet files' decoded rows."""
    leaked = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            text += json.dumps(pq.read_table(path).to_pylist(), default=str)
        if TOKEN in text:
            leaked.append(str(path.relative_to(root)))
    return leaked


def test_no_credential_in_any_file_written_or_line_printed(
    tmp_path: Path, digit_shards: list[str], capsys: pytest.CaptureFixture
) -> None:
    """extract -> train (and --resume) -> eval -> embed -> info -> verify -> islands, reruns and refusals included,
    on a ``pipe:`` input carrying a fake bearer token and a folder, caches and run whose path holds ``user:TOKEN@``;
    every command still works (reruns recognise their own shards and parts) and the token shows nowhere."""
    base = tmp_path / f"user:{TOKEN}@store"
    (base / "shards").mkdir(parents=True)
    shutil.copy(digit_shards[1], base / "shards")
    inputs = [
        f'pipe:env "AUTHORIZATION=Bearer {TOKEN}" cat {digit_shards[0]}',
        str(base / "shards"),
        f'pipe:env "AUTHORIZATION=Bearer {TOKEN}" cat {tmp_path}/missing/digits-0009.tar',  # fails alone
    ]
    cache, run, emb = base / "train.zarr", base / "run", base / "emb"
    extract = ["extract", *inputs, "--out", cache, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST]
    train = ["train", cache, "--out", run, *TRAIN_FAST, "--max-steps", "2"]
    embed = ["embed", *inputs[:2], "--student", run, "--out", emb, "--head-cache", cache, "--loader-workers", "0"]
    printed = []

    def step(*args: object, code: int = 0) -> str:
        outcome = run_main(capsys, *map(str, args))
        printed.append(outcome.stdout + outcome.stderr)
        assert outcome.returncode == code, outcome.stdout + outcome.stderr
        return outcome.stdout + outcome.stderr

    assert "2 done" in step(*extract, code=1)  # the missing tar fails, the others are written
    assert "2 already complete" in step(*extract[:3], *extract[4:], code=0)  # a rerun recognises its shards
    step(*extract[:3], *extract[4:], "--dtype", "float16", code=2)  # a refusal naming the cache
    step(*train)
    step(*train, code=2)  # already holds a run: a refusal naming it
    step(*train, "--resume")  # the redacted record still matches
    step("eval", cache, "--student", run, "--train-cache", cache, "--max-samples", "24", "--batch-size", "8")
    assert "2 done" in step(*embed)
    assert "2 already complete" in step(*embed)  # a rerun recognises its parts and head
    step("embed", *inputs[:2], "--student", run, "--out", base / "emb-default", "--loader-workers", "0")
    step("info", cache)
    step("info", cache, "--json")
    step("verify", cache, "--samples", "2")
    step("islands", cache, "--student", run, "--out", base / "islands.png", "--images", "2")
    step("eval", base / "none.zarr", "--student", run, code=2)

    from apmpipe.pipeline.cli.train import resume_command
    from apmpipe.stages.train import TrainConfig

    printed.append(resume_command(TrainConfig(caches=(str(cache),), out=str(run))))
    assert "***@store" in printed[-1]
    head = json.loads((emb / "manifest.json").read_text())["head"]
    assert head["cache"] == str(cache).replace(f"user:{TOKEN}", "***")  # found, and recorded redacted
    assert [text for text in printed if _leaks(text)] == []
    assert _written_with_token(tmp_path) == []


def test_no_credential_on_an_object_store(
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811 (the fixture imported above)
    digit_shards: list[str],
    capsys: pytest.CaptureFixture,
) -> None:
    """The same on S3 (moto's server): the secret key of ``--storage-option`` and the pipe's token are in no object
    and no printed line, and embed finds the head through the run's recorded (unredacted: no credential) cache URL."""
    import s3fs

    fs = s3fs.S3FileSystem(key="AKIAEXAMPLE", secret=TOKEN, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("secret-bucket")
    opts = [f"--storage-option={p}" for p in (f"endpoint_url={s3_endpoint}", "key=AKIAEXAMPLE", f"secret={TOKEN}")]
    source = f'pipe:env "AUTHORIZATION=Bearer {TOKEN}" cat {digit_shards[0]}'
    cache, run, emb = "s3://secret-bucket/cache.zarr", "s3://secret-bucket/run", tmp_path / "emb"
    commands = [
        ["extract", source, "--out", cache, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST],
        ["train", cache, "--out", run, *TRAIN_FAST, "--max-steps", "2"],
        ["eval", cache, "--student", run, "--max-samples", "16", "--batch-size", "8"],
        ["embed", source, "--student", run, "--out", emb, "--loader-workers", "0"],
        ["info", cache, "--json"],
        ["verify", cache, "--samples", "2"],
    ]
    printed = []
    for command in commands:
        outcome = run_main(capsys, *map(str, command), *opts)
        assert outcome.returncode == 0, outcome.stdout + outcome.stderr
        printed.append(outcome.stdout + outcome.stderr)
    assert json.loads((emb / "manifest.json").read_text())["head"]["cache"] == cache
    assert [text for text in printed if _leaks(text)] == []
    assert [key for key in fs.find("secret-bucket") if TOKEN.encode() in fs.cat_file(key)] == []
    assert _written_with_token(tmp_path) == []
