"""Issue 13: a new user's first hour. Each behaviour through the CLI: fast one-line errors (offline hub, option
checks before torch loads, mismatches naming field and values, hints that point the right way), Ctrl-C and
SIGTERM during training, ``pipe:`` inputs, progress and help at 80 columns, verdicts, islands conversions.

Timings (offline failure, option errors) are printed, not asserted: run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from .conftest import FAST, TINY_TRAIN, TINY_VIT, one_error_line, run_main

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: connections are refused at once


def _apmpipe(
    *args: object, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``apmpipe ARGS`` in a real process with extra environment; (result, seconds it took)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "apmpipe.pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return result, time.perf_counter() - start


# -- 1: no network ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, expected",
    [
        ({"HF_ENDPOINT": UNREACHABLE_HUB}, "cannot reach the Hugging Face hub at http://127.0.0.1:9"),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ],
)
def test_an_unreachable_hub_fails_fast_in_one_line(
    tmp_path: Path, digit_shards: list[str], env: dict[str, str], expected: str
) -> None:
    result, seconds = _apmpipe(
        "extract",
        digit_shards[0],
        "--out",
        tmp_path / "c.zarr",
        "--teacher",
        "vit_tiny_patch16_224",
        env={**env, "HF_HOME": str(tmp_path / "hf")},
    )
    print(f"\noffline extract ({', '.join(env)}): exit {result.returncode} after {seconds:.1f} s")
    assert result.returncode == 2 and expected in one_error_line(result.stderr) and "--no-pretrained" in result.stderr


def test_hub_weights_in_the_local_cache_load_without_the_network(tmp_path: Path, digit_shards: list[str]) -> None:
    import timm
    from safetensors.torch import save_file

    from apmpipe.stages.teacher import _weights_sha256

    kwargs = {"img_size": 32, "depth": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    repo = model.pretrained_cfg["hf_hub_id"]
    snapshot = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    out = tmp_path / "c.zarr"
    result, seconds = _apmpipe(
        "extract",
        digit_shards[0],
        "--out",
        out,
        "--teacher",
        "vit_tiny_patch16_224",
        *FAST,
        *[f"--model-arg={k}={v}" for k, v in kwargs.items()],
        env={"HF_ENDPOINT": UNREACHABLE_HUB, "HF_HOME": str(tmp_path / "hf")},
    )
    print(f"\nextract with cached hub weights, hub unreachable: {seconds:.1f} s")
    assert result.returncode == 0, result.stderr
    stored = json.loads((out / "zarr.json").read_text())["attributes"]["apmpipe"]["spec"]["teacher"]
    assert stored["weights"] == "pretrained" and stored["weights_sha256"] == _weights_sha256(model)


# -- 2: options and inputs are checked before torch, timm and the teacher -------------------------------------------
CHECK_FIRST = """
import sys, time
from apmpipe.pipeline.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print(exc.code, 'torch' in sys.modules, 'timm' in sys.modules, round(time.perf_counter() - start, 2))
"""


@pytest.mark.parametrize(
    "change, message",
    [
        ({0: "missing.tar"}, "input 'missing.tar' does not exist"),
        ({"--layers": "x"}, "--layers 'x' is not a comma-separated list"),
        ({"--batch-size": "0"}, "--batch-size must be at least 1"),
        ({"--shard-samples": "20"}, "--shard-samples (20) must be a positive multiple of --chunk-samples (8)"),
        ({"--teacher": "local-dir:/nope"}, "'/nope' is not a folder"),
        ({"--checkpoint": "/nope.safetensors"}, "--checkpoint '/nope.safetensors' does not exist"),
    ],
)
def test_extract_refuses_bad_options_before_loading_torch(
    tmp_path: Path, digit_shards: list[str], change: dict, message: str
) -> None:
    args = [digit_shards[0], "--out", str(tmp_path / "c.zarr"), *TINY_VIT, *FAST]
    for key, value in change.items():
        if key == 0:
            args[0] = value
        elif key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHECK_FIRST, "extract", *args], capture_output=True, text=True, timeout=120
    )
    code, torch_loaded, timm_loaded, seconds = result.stdout.split()
    print(
        f"\n{message[:40]!r}: exit {code} in {seconds} s in-process, {time.perf_counter() - start:.2f} s "
        "with interpreter start"
    )
    assert message in one_error_line(result.stderr) and code == "2"
    assert (torch_loaded, timm_loaded) == ("False", "False")
    assert "local-dir:/path" not in result.stderr


# -- 3: mismatches name the field and the two values -------------------------------------------------------------
def test_mismatch_messages_name_the_field_and_both_values(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, digit_shards: list[str]
) -> None:
    deeper = [a.replace("depth=2", "depth=3") for a in TINY_VIT]
    result = run_main(
        capsys,
        "extract",
        digit_shards[0],
        "--out",
        tiny_cache,
        *deeper,
        "--layers",
        "1,-1",
        "--dtype",
        "float32",
        *FAST,
    )
    assert "was written with teacher.model_kwargs.depth 2, not 3;" in one_error_line(result.stderr)
    other = tmp_path / "last-level.zarr"
    assert (
        run_main(
            capsys, "extract", digit_shards[0], "--out", other, *TINY_VIT, "--layers", "-1", "--dtype", "float32", *FAST
        ).returncode
        == 0
    )
    result = run_main(capsys, "train", tiny_cache, other, "--out", tmp_path / "run", *TINY_TRAIN)
    line = one_error_line(result.stderr)
    assert "differs in levels: [layer 2] vs [layer 1, layer 2]" in line and len(line) < 300, line


# -- 4: hints that point the right way, help without an empty error, --version -------------------------------------
def test_hints_point_the_right_way(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, digit_shards: list[str]
) -> None:
    result = run_main(capsys, "train", digit_shards[0], "--out", tmp_path / "run")
    line = one_error_line(result.stderr)  # also: no blank line before it
    assert "is an input shard, not a feature cache" in line and "extract it first" in line, line
    assert f"--out {digit_shards[0]}" not in line
    result = run_main(capsys, "eval", tiny_cache, "--student", tmp_path / "nostudent")
    assert (
        "nostudent: it does not exist" in one_error_line(result.stderr) and "(expected nostudent)" not in result.stderr
    )
    (tmp_path / "empty").mkdir()
    result = run_main(capsys, "islands", tiny_cache, "--student", tmp_path / "empty")
    assert "empty: it holds no student.safetensors" in one_error_line(result.stderr)
    bare = run_main(capsys)
    assert bare.stdout.startswith("Usage: ") and bare.stderr == ""
    version = run_main(capsys, "--version")
    assert version.returncode == 0 and re.fullmatch(r"apmpipe \d+\.\d+\.\d+\S*\n", version.stdout)


# -- 5: interrupting and resuming training -------------------------------------------------------------------------
def _stop_training(args: list[str], metrics: Path, sig: int, after_step: int) -> subprocess.CompletedProcess:
    """Start ``apmpipe train ARGS``, send ``sig`` once metrics pass ``after_step``; the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apmpipe.pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] > after_step:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_and_sigterm_save_a_checkpoint_and_print_the_resume_command(tmp_path: Path, tiny_cache: Path) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        str(tiny_cache),
        "--out",
        str(run),
        *TINY_TRAIN,
        "--max-steps",
        "100000",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "100000",
        "--checkpoint-minutes",
        "0",
    ]
    stopped = _stop_training(args, run / "metrics.jsonl", signal.SIGINT, 3)
    assert stopped.returncode == 130, stopped.stderr
    step = int(re.search(r"SIGINT: stopped at step (\d+); checkpoint saved in ", stopped.stderr).group(1))
    assert (run / "checkpoints" / f"step-{step:08d}").is_dir() and not (run / "student.safetensors").exists()
    command = re.search(r"resume with: (apmpipe train .*)", stopped.stderr).group(1).split()
    assert command[-1] == "--resume" and "--lr 0.001" in " ".join(command)
    resumed = _stop_training(command[1:], run / "metrics.jsonl", signal.SIGTERM, step + 2)
    assert resumed.returncode == 143 and f"resuming from step {step} of 100000" in resumed.stderr, resumed.stderr
    assert "SIGTERM: stopped at step" in resumed.stderr


def test_resume_refuses_nothing_to_resume_and_changed_options(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    run = tmp_path / "run"
    result = run_main(capsys, "train", tiny_cache, "--out", run, *TINY_TRAIN, "--resume")
    assert f"no checkpoint in {run}; drop --resume" in one_error_line(result.stderr)
    assert run_main(capsys, "train", tiny_cache, "--out", run, *TINY_TRAIN, "--max-steps", "4").returncode == 0
    changed = [a if a != "8" else "4" for a in TINY_TRAIN]  # --batch-size 4
    result = run_main(
        capsys, "train", tiny_cache, "--out", run, *changed, "--max-steps", "4", "--lr", "5e-4", "--resume"
    )
    line = one_error_line(result.stderr)
    assert (
        "--resume would change the run" in line
        and "--batch-size 4 (run: 8)" in line
        and "--lr 0.0005 (run: 0.001)" in line  # the run's LR: 2e-3 x sqrt(8 / 32)
    )


def test_checkpoints_are_also_written_by_wall_time(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    run = tmp_path / "run"
    result = run_main(
        capsys,
        "train",
        tiny_cache,
        "--out",
        run,
        *TINY_TRAIN,
        "--max-steps",
        "12",
        "--checkpoint-every",
        "1000",
        "--checkpoint-minutes",
        "1e-6",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-00000011",
        "step-00000012",
    ]  # the last two kept


# -- 6: pipe: inputs -----------------------------------------------------------------------------------------------
def test_pipe_inputs_are_read_through_the_shell_or_refused_by_name(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", f"pipe:cat {digit_shards[0]}", "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (out / "shards").iterdir() if p.is_dir()] == ["digits-0000"]
    assert zarr.open_group(out, mode="r")["shards/digits-0000/labels"].shape == (40,)
    result = run_main(capsys, "extract", "pipe:echo hello", "--out", tmp_path / "d.zarr", *TINY_VIT, *FAST)
    line = one_error_line(result.stderr)  # the command's arguments redacted, as every printed pipe: command
    assert "input 'pipe:echo ***' names no .tar/.tar.gz/.tgz file in its command" in line


# -- 7, 8: progress and help at 80 columns ---------------------------------------------------------------------------
def test_train_progress_keeps_steps_epoch_and_eta_within_80_columns(
    tmp_path: Path, tiny_cache: Path, eval_cache: Path
) -> None:
    result, _ = _apmpipe(
        "train",
        tiny_cache,
        "--out",
        tmp_path / "run",
        *TINY_TRAIN,
        "--max-steps",
        "20",
        "--log-every",
        "5",
        "--val",
        eval_cache,
        "--val-every",
        "10",
        env={"COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    bar = next(line for line in result.stderr.splitlines() if line.startswith("train"))
    assert len(bar) <= 80 and "20/20" in bar and "epoch 2" in bar and "ETA" in bar, bar
    detail = result.stderr.splitlines()[result.stderr.splitlines().index(bar) + 1]
    assert "loss" in detail and "L1" in detail and "loss" not in bar, detail
    assert re.search(r"held-out -?\d\.\d{3} \(best -?\d\.\d{3}\)", detail), detail  # before samples/s, which may be cut


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["extract"],
        ["info"],
        ["verify"],
        ["train"],
        ["eval"],
        ["islands"],
        ["embed"],
        ["demo"],
        ["bench"],
        ["bench", "extract"],
        ["bench", "train"],
        ["bench", "ablation"],
        ["bench", "bytes"],
        ["bench", "augment"],
        ["bench", "codecs"],
        ["bench", "pipeline"],
    ],
)
def test_help_reads_at_80_columns(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = run_main(capsys, *command, "--help")
    text = [line for line in result.stdout.splitlines() if not line.startswith("Usage:")]
    assert result.returncode == 0 and text
    assert max(len(line) for line in text) <= 80 and not any(
        "…" in line or line.endswith("...") or "<bool>" in line for line in text
    ), result.stdout


# -- 9: verdicts and reasons --------------------------------------------------------------------------------------
def test_verify_gives_a_verdict_against_a_stated_tolerance(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    result = run_main(capsys, "verify", tiny_cache, "--samples", "2")
    assert result.returncode == 0 and "PASS" in result.stdout and "tolerance >=" in result.stdout, result.stdout
    broken = tmp_path / "broken.zarr"
    shutil.copytree(tiny_cache, broken)
    tokens = zarr.open_array(str(next(broken.glob("shards/*/tokens/*/zarr.json")).parent), mode="r+")
    tokens[:] = np.random.default_rng(0).normal(size=tokens.shape).astype(tokens.dtype)
    result = run_main(capsys, "verify", broken, "--samples", "6")
    assert result.returncode == 1 and "FAIL: layer" in result.stdout, result.stdout


def test_eval_says_why_knn_and_probe_are_absent(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, eval_cache: Path
) -> None:
    result = run_main(
        capsys, "eval", eval_cache, "--student", tiny_student, "--out", tmp_path / "report", "--max-samples", "16"
    )
    assert result.returncode == 0 and "knn skipped" in result.stdout and "--train-cache" in result.stdout, result.stdout


def test_bench_extract_prints_what_it_measures(tmp_path: Path) -> None:
    result, _ = _apmpipe(
        "bench",
        "extract",
        "--images",
        "8",
        "--model-arg",
        "img_size=32",
        "--model-arg",
        "depth=2",
        "--layers",
        "1,2",
        "--batch-size",
        "8",
        "--loader-workers",
        "0",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    phases = [line for line in result.stderr.splitlines() if line.startswith("bench: ")]
    assert len(phases) >= 4 and "apmpipe extract" in " ".join(phases), result.stderr


def test_bench_train_ships_low_rank_coefficients_and_compares(tmp_path: Path) -> None:
    result, _ = _apmpipe(
        "bench",
        "train",
        "--teacher",
        "vit_tiny_patch16_224",
        "--model-arg",
        "img_size=32",
        "--model-arg",
        "depth=2",
        "--layers",
        "1,2",
        "--images",
        "32",
        "--batch-size",
        "8",
        "--online-batch-sizes",
        "8,16,64",
        "--preset",
        "tiny",
        "--loader-workers",
        "0",
        "--growth",
        "1",
        "--locations",
        "16",
        "--echo",
        "2",
        "--dtype",
        "int8",
        "--rank",
        "16",
        "--device",
        "cpu",
        env={"COLUMNS": "240"},
    )
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    for shown in (
        "bytes read / trained sample",
        "echo 2",
        "loader shipping coefficients",
        "rebuilding tokens on its CPU",
        "layers 1,2",
        "fused attention in 2 blocks",  # the online teacher's own fast path (autocast and channels_last: CUDA only)
        "cached / online",
    ):
        assert shown in out, result.stdout
    online = re.search(r"at its best batch (\d+) \(tried 8: ([\d.]+)/s, 16: ([\d.]+)/s;", out)
    assert online and float(online[2 + [8, 16].index(int(online[1]))]) == max(map(float, online.groups()[1:]))
    assert "batch 64: skipped, more than the 32 cached samples" in result.stderr


GPU_CHECK = Path(__file__).parent.parent / ".ci" / "gpu-check"


def _gpu_check(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``.ci/gpu-check ARGS``, its venv made from this interpreter, its logs under ``tmp_path``."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "gpu-check")}
    return subprocess.run([GPU_CHECK, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where no CUDA device is present")
def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    result = _gpu_check(tmp_path, timeout=120)
    assert result.returncode == 2 and not result.stdout, result
    assert result.stderr.count("\n") == 1 and "no CUDA device" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.slow  # installs the project into a venv, then 4 tiny bench train runs: a minute or more when loaded
def test_gpu_check_dry_run_prints_its_one_table(tmp_path: Path) -> None:
    """The GPU script's own path on the CPU: install, the stage breakdown, the first 4 rows measured (every teacher,
    storage and echo among them), the other 4 named as not run, one table."""
    result = _gpu_check(tmp_path, "--dry-run", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows_text, _, breakdown = result.stdout.partition("where the time goes")
    assert "rc 0" in breakdown and "limiting stage" in breakdown and "loader cores needed" in breakdown, breakdown
    table = [[cell.strip() for cell in line.split("|")] for line in rows_text.splitlines() if " | " in line]
    assert table[0][:3] == ["teacher", "storage", "echo"] and len(table) == 1 + 8, result.stdout
    rows = {tuple(row[:3]) for row in table[1:]}
    assert rows == {(t, s, e) for t in ("ViT-B/16", "ViT-L/14") for s in ("float16", "int8 rank 8") for e in "18"}
    measured = {tuple(row[:3]) for row in table[1:] if re.fullmatch(r"\d+\.\d\dx", row[-1])}
    assert measured == {("ViT-B/16", "float16", "1"), ("ViT-B/16", "int8 rank 8", "8"), ("ViT-L/14", "float16", "1"),
                        ("ViT-L/14", "int8 rank 8", "8")}, result.stdout  # fmt: skip
    assert sum("not run: dry run" in row for row in table[1:]) == 4, result.stdout


# -- 14: islands says what it did to image files ----------------------------------------------------------------
def test_islands_says_what_it_converted(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path) -> None:
    Image.new("L", (32, 32), 128).save(tmp_path / "gray.png")
    Image.new("RGB", (200, 150), (200, 30, 40)).save(tmp_path / "photo.jpg")
    result = run_main(
        capsys,
        "islands",
        tmp_path / "gray.png",
        tmp_path / "photo.jpg",
        "--student",
        tiny_student,
        "--out",
        tmp_path / "i.png",
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stderr.count("\n") == 1
        and "islands: images converted to the teacher's 3-channel 32x32 input: L to RGB, 1 resized to 32x32"
        in result.stderr
    )
    result = run_main(
        capsys,
        "islands",
        tmp_path / "gray.png",
        "--student",
        tiny_student,
        "--out",
        tmp_path / "j.png",
        "--images",
        "1",
    )
    assert "converted" in result.stderr
    Image.new("RGB", (32, 32)).save(tmp_path / "fits.png")
    result = run_main(capsys, "islands", tmp_path / "fits.png", "--student", tiny_student, "--out", tmp_path / "k.png")
    assert result.stderr == ""
    # above PIL's own decompression-bomb limit (Image.open raises before any check of ours): still one line
    bomb = tmp_path / "bomb.png"
    Image.new("1", (16_000, 16_000)).save(bomb)
    result = run_main(capsys, "islands", bomb, "--student", tiny_student, "--out", tmp_path / "b.png")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "has more than 64,000,000 pixels, islands' limit; pass a downscaled copy" in result.stderr


def test_islands_picture_has_gaps_labels_and_a_caption(tmp_path: Path, tiny_student: Path, eval_cache: Path) -> None:
    from apmpipe.stages.islands import GAP, HEADER, LABEL, islands

    result = islands(str(tiny_student), [str(eval_cache)], str(tmp_path / "i.png"), images=2, panel=64, device="cpu")
    with Image.open(result.path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert result.width == GAP + 5 * (64 + GAP)  # image, then student and teacher for 2 levels
    assert result.height > HEADER + 2 * (LABEL + 64 + GAP)  # a caption below the rows
    between = pixels[HEADER + LABEL : HEADER + LABEL + 64, GAP + 64 : 2 * GAP + 64]
    assert (between == 255).all()  # white gaps between panels
