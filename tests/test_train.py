"""Stage two through the CLI: learning, streaming/sharding, resume after SIGKILL, DDP, config files, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from apmpipe.stages.apm import APMConfig
from apmpipe.storage.checkpoint import load_student
from apmpipe.storage.stream import CacheStream, StreamPosition, window_batches

from .conftest import TRAIN_FAST, run_cli, run_main, train_killed_and_resumed


def test_student_learns_from_cache(tmp_path: Path, tiny_cache: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(
        "train", tiny_cache, "--out", run, *TRAIN_FAST, "--epochs", "6", "--lr", "2e-3", "--warmup-steps", "5"
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 * 15
    first, last = records[0], records[-1]
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert (
        last["loss_level_1"] < first["loss_level_1"]
        and last["loss_level_2"] < first["loss_level_2"]
        and last["loss_rgb"] < first["loss_rgb"]
    )
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights, meta = load_student(run)
    assert meta["model_config"]["grid"] == [2, 2] and meta["layout"]["levels"][1]["layer"] == 2
    assert (run / "config.toml").exists()


def test_training_never_builds_or_imports_the_teacher(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was constructed during training")

    monkeypatch.setattr(timm, "create_model", refuse)
    result = run_cli("train", tiny_cache, "--out", tmp_path / "run", *TRAIN_FAST, "--max-steps", "3")
    assert result.exit_code == 0, result.output
    code = (
        "import sys, apmpipe.stages.train, apmpipe.stages.apm, apmpipe.storage.stream; assert 'timm' not in "
        "sys.modules, 'timm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 2)])
def test_stream_covers_each_sample_once_per_epoch(tiny_cache: Path, world: int, workers: int) -> None:
    from torch.utils.data import DataLoader

    seen: list[bytes] = []
    steps = []
    for rank in range(world):
        stream = CacheStream([str(tiny_cache)], batch_size=8, window_samples=24, seed=3, rank=rank, world_size=world)
        count = 0
        for item in DataLoader(stream, batch_size=None, num_workers=workers):
            for batch in window_batches(item):
                count += 1
                seen += [t.numpy().tobytes() for t in batch["tokens"][0]]
        steps.append(count)
    assert len(set(steps)) == 1 and steps[0] == stream.steps_per_epoch()
    assert len(seen) == len(set(seen)), "a sample was delivered twice in one epoch"
    if world == 1:
        assert len(seen) == 120  # 120 samples, batch 8: every sample exactly once
    else:
        assert len(seen) >= 120 - world * 8  # equal whole batches per rank drop less than a batch each


def test_stream_order_depends_on_epoch_and_resumes_mid_window(tiny_cache: Path) -> None:
    from apmpipe.storage.stream import StreamPosition

    stream = CacheStream([str(tiny_cache)], batch_size=8, window_samples=24, seed=0)

    def batches(position: StreamPosition) -> list[bytes]:
        stream.position = position
        return [
            b["pixels"].numpy().tobytes() + b["tokens"][1].numpy().tobytes()
            for item in stream
            for b in window_batches(item)
        ]

    epoch0, epoch1 = batches(StreamPosition(0)), batches(StreamPosition(1))
    assert epoch0 != epoch1 and len(epoch0) == len(epoch1) == 15
    assert batches(StreamPosition(0, window=2, batch=1)) == epoch0[2 * 3 + 1 :]


@pytest.mark.parametrize("options", [(), ("--echo", "3"), ("--ema-decay", "0.9")])
def test_resume_after_sigkill_gives_identical_weights(
    tmp_path: Path, tiny_cache: Path, options: tuple[str, ...]
) -> None:
    args = [
        "train",
        str(tiny_cache),
        *TRAIN_FAST,
        "--loader-workers",
        "1",
        "--max-steps",
        "40",
        "--checkpoint-every",
        "4",
        "--warmup-steps",
        "3",
        "--locations",
        "3",
        *options,
    ]
    reference, killed = train_killed_and_resumed(args, tmp_path)
    ref, _ = load_student(reference)
    got, _ = load_student(killed)
    for key in ref:
        assert ref[key].equal(got[key]), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_ema_exports_the_average_and_checkpoints_it_beside_the_weights(tmp_path: Path, tiny_cache: Path) -> None:
    from apmpipe.storage.checkpoint import RunDir

    run = tmp_path / "run"
    result = run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "12", "--ema-decay", "0.9")
    assert result.exit_code == 0, result.output
    exported, _ = load_student(run)
    trained, state = RunDir(run).load_checkpoint()
    assert state["step"] == 12 and set(state["ema"]) < set(trained)
    for name, average in state["ema"].items():
        assert exported[name].equal(average) and not average.equal(trained[name]), name
    buffers = set(trained) - set(state["ema"])
    assert buffers and all(exported[name].equal(trained[name]) for name in buffers)


def test_max_epochs_caps_the_budget_sized_from_min_steps(tmp_path: Path, tiny_cache: Path) -> None:
    # 120 samples, batch 8: 15 steps an epoch; --min-steps 4000 alone would ask 267 epochs
    run = tmp_path / "run"
    result = run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-epochs", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and records[-1]["epoch"] == 1


def test_ddp_two_processes_gloo_with_uneven_shards_per_rank(tmp_path: Path, tiny_cache: Path) -> None:
    # 3 shards of 40 in chunks of 8 = 15 blocks: 8 for one rank, 7 for the other; both must run the same steps
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    run = tmp_path / "ddp"
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "apmpipe.pipeline",
            "train",
            str(tiny_cache),
            "--out",
            str(run),
            *TRAIN_FAST,
            "--epochs",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stream = CacheStream([str(tiny_cache)], batch_size=8, rank=0, world_size=2)
    assert records[-1]["step"] == 2 * stream.steps_per_epoch()
    weights, _ = load_student(run)
    assert all(np.isfinite(w.numpy()).all() for w in weights.values())


def test_config_file_with_cli_overrides(tmp_path: Path, tiny_cache: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text(
        'preset = "tiny"\nlr = 0.003\nmax-steps = 7\nbatch_size = 8\nlog_every = 1\nwindow_samples = '
        "32\nloader_workers = 0\n"
    )
    run = tmp_path / "run"
    result = run_cli("train", tiny_cache, "--out", run, "--config", config, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    saved = (run / "config.toml").read_text()
    assert "lr = 0.003" in saved and "max_steps = 4" in saved and 'preset = "tiny"' in saved
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_train_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path) -> None:
    def error(*args: str) -> str:
        result = run_main(capsys, "train", *args)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        return lines[0]

    assert "no feature cache" in error(tmp_path / "missing.zarr", "--out", tmp_path / "r1")
    empty = tmp_path / "empty.zarr"
    shutil.copytree(tiny_cache, empty)
    for group in (empty / "shards").iterdir():
        if group.is_dir():
            shutil.rmtree(group)
    assert "has no complete shard" in error(empty, "--out", tmp_path / "r2")
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_cache, old)
    root = zarr.open_group(str(old), mode="r+")
    root.update_attributes({"apmpipe": {**root.attrs["apmpipe"], "version": 99}})
    assert "format version 99" in error(old, "--out", tmp_path / "r3")
    run = tmp_path / "r4"
    assert run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "2").exit_code == 0
    assert "already holds a training run" in error(tiny_cache, "--out", run, *TRAIN_FAST)
    changed = error(tiny_cache, "--out", run, *TRAIN_FAST, "--preset", "small", "--resume")
    assert "--resume would change the run" in changed and "--preset small (run: tiny)" in changed
    layout = error(tiny_cache, "--out", run, *TRAIN_FAST, "--levels", "1", "--max-steps", "2", "--resume")
    assert "another teacher layout than these caches (--levels 1 (run: (default)))" in layout
    assert "--batch-size must be at least 1" in error(tiny_cache, "--out", tmp_path / "r5", "--batch-size", "0")


def test_float32_caches_stream_float32_tokens(tiny_cache: Path) -> None:
    import torch

    stream = CacheStream([str(tiny_cache)], batch_size=8)
    assert stream.spec.dtype == "float32"
    batch = next(window_batches(next(iter(stream))))
    assert all(t.dtype == torch.float32 for t in batch["tokens"])


def test_location_draws_differ_by_rank_and_always_include_prefix_tokens() -> None:
    from apmpipe.stages.objectives import location_generator, sample_locations

    rank0 = sample_locations(4, 1, 64, 8, location_generator(0, 0, 5))
    rank1 = sample_locations(4, 1, 64, 8, location_generator(0, 1, 5))
    again = sample_locations(4, 1, 64, 8, location_generator(0, 0, 5))
    assert rank0.shape == (4, 9) and (rank0[:, 0] == 0).all() and (rank0[:, 1:] >= 1).all()
    assert torch.equal(rank0, again) and not torch.equal(rank0, rank1)


def test_resume_plan_compares_caches_by_location_not_spelling(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_cache.parent)
    relative = CacheStream([f"./{tiny_cache.name}"], 8)
    absolute = CacheStream([str(tiny_cache)], 8)
    assert relative.fingerprint() == absolute.fingerprint()


def test_toml_values_are_type_checked_and_run_options_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    bad_type = tmp_path / "a.toml"
    bad_type.write_text('lr = "3e-4"\n')
    result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "r", "--config", bad_type)
    assert result.returncode == 2 and "'lr' must be float" in result.stderr and result.stderr.count("\n") == 1, (
        result.stderr
    )
    for text in ('out = "elsewhere"\n', 'caches = ["x.zarr"]\n', "no_such_option = 1\n"):
        path = tmp_path / "b.toml"
        path.write_text(text)
        result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "r", "--config", path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    good = tmp_path / "c.toml"
    good.write_text("lr = 1\nhidden = [16, 16]\nlogit_weight = 0\n")  # ints where floats are declared are fine
    result = run_main(
        capsys, "train", tiny_cache, "--out", tmp_path / "r", "--config", good, *TRAIN_FAST, "--max-steps", "2"
    )
    assert result.returncode == 0, result.stderr
    _, meta = load_student(tmp_path / "r")
    assert (
        meta["train_config"]["lr"] == 1.0
        and meta["model_config"]["hidden"] == [16, 16]
        and meta["loss_config"]["logit_weight"] == 0.0
    )


def test_per_class_plot_stays_readable_for_many_classes(tmp_path: Path) -> None:
    from PIL import Image

    from apmpipe.pipeline.report import plot_per_class

    rng = np.random.default_rng(0)
    path = plot_per_class(
        {"student": list(rng.random(1500)), "teacher": list(rng.random(1500))}, "1,500 classes", tmp_path / "many.png"
    )
    with Image.open(path) as image:
        assert image.size[0] < 2000  # a histogram, not 1,500 bar pairs


def test_echo_trains_several_steps_per_loaded_batch(tmp_path: Path, tiny_cache: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--epochs", "1", "--echo", "3", "--log-every", "1")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 3 * 15 + 1)) and records[-1]["epoch"] == 0
    assert all(r["data_wait_s"] >= 0 for r in records)


def test_echo_passes_reshuffle_each_loaded_window(tiny_cache: Path) -> None:
    """--echo E: every sample of a loaded window trains once per pass, in other batch company each pass, and a
    position inside an echo pass resumes on exactly the remaining batches."""
    plain, echoed = CacheStream([str(tiny_cache)], 8, 32), CacheStream([str(tiny_cache)], 8, 32, echo=3)
    first_plain, first_echoed = next(iter(plain)), next(iter(echoed))
    plain_batches = [b["labels"] for b in window_batches(first_plain)]
    passes = [b["labels"] for b in window_batches(first_echoed)]
    assert len(passes) == 3 * len(plain_batches) and all(
        torch.equal(a, b) for a, b in zip(plain_batches, passes[: len(plain_batches)], strict=True)
    )
    keys = [b["pixels"].flatten(1) for b in window_batches(first_echoed)]
    per_pass = [torch.cat(keys[i * 4 : (i + 1) * 4]) for i in range(3)]
    for other in per_pass[1:]:  # the same samples, in another order
        assert sorted(map(bytes, per_pass[0].numpy())) == sorted(map(bytes, other.numpy()))
        assert not torch.equal(per_pass[0], other)
    echoed.position = StreamPosition(0, 0, 6)  # two batches into the second pass
    resumed = [b["pixels"] for b in window_batches(next(iter(echoed)))]
    assert len(resumed) == 6 and all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(resumed, keys[6:], strict=True))


def test_levels_train_decode_and_evaluate_only_those_levels(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, eval_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apmpipe.storage.cache as cache_module

    decoded: list[tuple[int, ...]] = []
    real_decode = cache_module.decode_tokens
    monkeypatch.setattr(
        cache_module, "decode_tokens", lambda values, *rest: decoded.append(values.shape) or real_decode(values, *rest)
    )
    runs = {}
    for name, levels in (("all", []), ("last", ["--levels", "2"])):
        decoded.clear()
        runs[name] = tmp_path / name
        result = run_cli("train", tiny_cache, "--out", runs[name], *TRAIN_FAST, "--max-steps", "6", *levels)
        assert result.exit_code == 0, result.output
        runs[name + "_reads"] = len(decoded)
    assert runs["last_reads"] * 2 == runs["all_reads"] > 0  # one token array per block instead of two
    _, meta = load_student(runs["last"])
    assert [lv["layer"] for lv in meta["layout"]["levels"]] == [2] and len(meta["model_config"]["level_dims"]) == 1
    records = [json.loads(line) for line in (runs["last"] / "metrics.jsonl").read_text().splitlines()]
    assert "loss_level_2" in records[-1] and "loss_level_1" not in records[-1]

    stream = CacheStream([str(tiny_cache)], 8, 32, levels=[2])
    full = CacheStream([str(tiny_cache)], 8, 32)
    view, whole = stream.load_window(0, 0, stream.windows(0)[0]), full.load_window(0, 0, full.windows(0)[0])
    assert len(view["tokens"]) == 1 and torch.equal(view["tokens"][0], whole["tokens"][1])

    # the full cache evaluates the student on its one level; a cache without layer 2 or a wrong --levels is refused
    result = run_main(capsys, "eval", eval_cache, "--student", runs["last"], "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert list(report["fidelity"]) == ["2"] and "teacher_head" in report["classification"], report
    result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "bad", *TRAIN_FAST, "--levels", "3")
    assert result.returncode == 2 and "layer(s) 3 not cached" in result.stderr and "cached layers 1,2" in result.stderr
    result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "bad", *TRAIN_FAST, "--levels", "1")
    assert result.returncode == 2 and "leaves out the final cached level (2)" in result.stderr, result.stderr
    # without the final level there is no head: eval's default feature falls back to the CLS token and says so
    first = tmp_path / "first"
    result = run_main(
        capsys,
        "train",
        tiny_cache,
        "--out",
        first,
        *TRAIN_FAST,
        "--levels",
        "1",
        "--logit-weight",
        "0",
        "--max-steps",
        "4",
    )
    assert result.returncode == 0, result.stderr
    result = run_main(
        capsys, "eval", eval_cache, "--student", first, "--train-cache", tiny_cache, "--out", tmp_path / "r1"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r1" / "eval.json").read_text())
    assert "teacher_head" not in report["classification"] and "cls features" in json.dumps(report), report


def _train_in_process(cache: Path, out: Path, **options: object) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A tiny CPU run of ``train`` (metric every step); its records and the exported student's weights."""
    from apmpipe.stages.train import TrainConfig, train

    config = TrainConfig.from_options(
        {
            "caches": (str(cache),),
            "out": str(out),
            "preset": "tiny",
            "batch_size": 8,
            "window_samples": 32,
            "loader_workers": 0,
            "device": "cpu",
            "log_every": 1,
            "warmup_steps": 1,
            **options,
        }
    )
    train(config)
    weights, _ = load_student(out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], weights


@pytest.mark.slow  # torch.compile's C++ build on a CPU: tens of seconds on a loaded 2-core box
@pytest.mark.parametrize("student", [{}, {"mixer_blocks": 1, "mixer_width": 32}], ids=["tiny", "mixer"])
def test_compiled_step_trains_like_the_eager_step(tmp_path: Path, tiny_cache: Path, student: dict) -> None:
    """--compile (the fast path) gives the eager step's losses and weights, step after step (also with the default
    student's cell mixer)."""
    eager, eager_weights = _train_in_process(tiny_cache, tmp_path / "eager", max_steps=4, **student)
    compiled, compiled_weights = _train_in_process(
        tiny_cache, tmp_path / "compiled", max_steps=4, compile=True, **student
    )
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "loss_level_1", "loss_level_2", "loss_rgb", "loss_logits"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert eager_weights.keys() == compiled_weights.keys()
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-4, atol=5e-5, msg=name)


def test_losses_are_read_only_at_log_steps(tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop leaves each step's losses on the device and reads them (a host sync on CUDA) every --log-every steps."""
    from apmpipe.stages.objectives import Losses

    reads: list[int] = []
    real_record = Losses.record
    monkeypatch.setattr(Losses, "record", lambda self, layers: reads.append(1) or real_record(self, layers))
    records, _ = _train_in_process(tiny_cache, tmp_path / "run", max_steps=10, log_every=5)
    assert [r["step"] for r in records] == [5, 10] and len(reads) == 2


def test_batch_lr_and_locations_defaults_follow_the_device() -> None:
    """Unset --batch-size: 64 on a CPU, 1024 on CUDA; unset --lr follows the batch by the square-root rule (2e-3 at 32),
    whether the batch is the device's or given by hand; unset --locations is 4."""
    from apmpipe.stages.train import TrainConfig

    config = TrainConfig(caches=("c",), out="o")
    cpu, cuda = config.for_device(torch.device("cpu")), config.for_device(torch.device("cuda"))
    assert (cpu.batch_size, cpu.locations) == (64, 4) and cpu.lr == pytest.approx(2e-3 * 2**0.5)
    assert cuda.batch_size == 1024 and cuda.lr == pytest.approx(2e-3 * 32**0.5)
    given = TrainConfig(caches=("c",), out="o", batch_size=32, locations=0).for_device(torch.device("cuda"))
    assert (given.batch_size, given.lr, given.locations) == (32, 2e-3, 0)
    assert TrainConfig(caches=("c",), out="o", lr=1e-3).for_device(torch.device("cuda")).lr == 1e-3


def test_few_images_warn_that_held_out_cls_will_trail_training(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    """Under 16,000 samples (images x views) with under 32 views each, train says in one line what follows and what
    helps: extract's default, --views auto, and --val."""
    with caplog.at_level(logging.WARNING):
        result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "r", *TRAIN_FAST, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    (warning,) = [r.getMessage() for r in caplog.records if "distinct images" in r.getMessage()]
    assert "120 distinct images x 1 view(s)" in warning and "extract --views auto, the default" in warning
    assert "--val" in warning


def test_a_plan_counts_views_per_image_over_all_its_caches() -> None:
    """Caches of one teacher extracted with different --views: the few-images warning weighs each by its images."""
    from apmpipe.storage.stream import Block, StreamPlan

    blocks = (Block(0, "a", 0, 10, views=4), Block(0, "a", 40, 50, views=4), Block(1, "b", 0, 60))
    plan = StreamPlan({(0, "a"): 80, (1, "b"): 60}, blocks, unit=8, window=16, seed=0, rank=0, world_size=1)
    assert plan.images == 80 and plan.views == (80 + 60) / 80


def test_cuda_default_batch_takes_half_the_steps() -> None:
    """Unset --min-steps: 4,000 on a CPU and at any batch given by hand; 2,000 with CUDA's default batch (1,024 images,
    16x the CPU's: 4,000 such steps over-fitted held-out CLS, docs/train.md); a given budget is kept anywhere."""
    from apmpipe.stages.train import TrainConfig

    cpu, cuda = (TrainConfig(caches=("c",), out="o").for_device(torch.device(kind)) for kind in ("cpu", "cuda"))
    assert (cpu.min_steps, cuda.min_steps) == (4000, 2000)
    by_hand = TrainConfig(caches=("c",), out="o", batch_size=64).for_device(torch.device("cuda"))
    assert by_hand.min_steps == 4000
    given = TrainConfig(caches=("c",), out="o", min_steps=300).for_device(torch.device("cuda"))
    assert (given.batch_size, given.min_steps) == (1024, 300)


def test_resume_keeps_the_runs_batch_lr_locations_and_budget_where_left_unset(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    """The defaults (64 images on a CPU, 1,024 on CUDA, 4 locations, 4,000 or 2,000 steps: they differ by device and
    by release) must not stand in for a resumed run's own batch, LR, locations per step and step budget."""
    unset = [a for a in TRAIN_FAST if a not in ("--batch-size", "8")]
    out = tmp_path / "r"
    first = run_main(
        capsys,
        "train",
        tiny_cache,
        "--out",
        out,
        *unset,
        "--batch-size",
        "8",
        "--lr",
        "0.001",
        "--locations",
        "16",
        "--min-steps",
        "30",
        "--max-steps",
        "2",
    )
    assert first.returncode == 0, first.stderr
    again = run_main(capsys, "train", tiny_cache, "--out", out, *unset, "--max-steps", "2", "--resume")
    assert again.returncode == 0, again.stderr
    saved = (out / "config.toml").read_text()
    assert "batch_size = 8" in saved and "lr = 0.001" in saved and "locations = 16" in saved
    assert "min_steps = 30" in saved


@pytest.mark.parametrize(
    ("mixer", "cells", "dropout"),
    [(0, 0, 0.0), (1, 0, 0.0), (1, 1, 0.1)],
    ids=["no-mixer", "mixer", "mixer-cells-dropout"],
)
def test_a_local_query_student_trains_evaluates_adapts_and_draws_islands(
    tmp_path: Path, tiny_cache: Path, eval_cache: Path, mixer: int, cells: int, dropout: float
) -> None:
    run = tmp_path / "run"
    mixing = ["--mixer-blocks", str(mixer), "--mixer-width", "32", *(["--trigger-cells", str(cells)] if cells else [])]
    mixing += ["--mixer-dropout", str(dropout)] if dropout else []
    result = run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--query", "local", "--max-steps", "6", *mixing)
    assert result.exit_code == 0, result.output
    weights, metadata = load_student(run)
    config = APMConfig.from_dict(metadata["model_config"])  # the tiny ViT: a 2x2 grid of 16x16 RGB cells
    # one cell's pixels join each query (and its mixed cell, with a mixer): the trunk's first layer reads them beside
    # T (every cell's filter output, or the mixed cells' mean and --trigger-cells channels of each of the 4 cells)
    # and the location code
    assert config.query == "local" and config.patch_size == (16, 16) and config.mixer_blocks == mixer
    assert config.trigger_cells == cells and config.mixer_dropout == dropout
    mixed_cell = 32 if mixer else 0
    assert weights["trunk.layers.0.weight"].shape[1] == config.trigger_dim + config.code_dim + 3 * 16 * 16 + mixed_cell
    assert config.trigger_dim == (32 + 4 * cells if mixer else config.trigger_channels * 4)
    out = tmp_path / "report"
    result = run_cli(
        "eval",
        eval_cache,
        "--student",
        run,
        "--out",
        out,
        "--ttt-steps",
        "2",
        "--ttt-samples",
        "1",
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert set(report["fidelity"]) == {"1", "2"} and report["ttt"]["samples"] == 1
    islands = tmp_path / "islands.png"
    assert run_cli("islands", eval_cache, "--student", run, "--out", islands, "--images", "2").exit_code == 0
    assert islands.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("option", "value"), [("--trigger-cells", "1"), ("--mixer-dropout", "0.1")])
def test_a_mixer_option_without_a_mixer_is_a_user_error(
    tmp_path: Path, tiny_cache: Path, option: str, value: str
) -> None:
    """The tiny preset has no mixer: an option of the mixer would change nothing, so it is refused, not ignored."""
    result = run_cli("train", tiny_cache, "--out", tmp_path / "run", *TRAIN_FAST, option, value)
    assert result.exit_code == 2 and f"{option} needs a cell mixer" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "student.safetensors").exists()


def test_a_run_saved_before_query_ema_and_max_epochs_existed_resumes(tmp_path: Path, tiny_cache: Path) -> None:
    """A run written by an apmpipe without --query/--ema-decay/--max-epochs resumes as it trained: a paper student."""
    import tomllib

    import tomli_w

    run = tmp_path / "run"
    args = ["train", str(tiny_cache), "--out", str(run), *TRAIN_FAST, "--max-steps", "4", "--checkpoint-every", "2"]
    assert run_cli(*args, "--query", "paper").exit_code == 0
    newer = ("query", "ema_decay", "max_epochs")
    options = {k: v for k, v in tomllib.loads((run / "config.toml").read_text()).items() if k not in newer}
    (run / "config.toml").write_text(tomli_w.dumps(options))
    state_file = sorted(run.glob("checkpoints/*/state.pt"))[-1]
    state = torch.load(state_file, weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k not in newer}
    assert "query" not in state["model_config"]  # a paper student saves what it did before --query
    torch.save(state, state_file)
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    _, config = load_student(run)
    assert APMConfig.from_dict(config["model_config"]).query == "paper"


def test_the_mixers_dropout_starts_after_the_warmup_and_resumes_with_the_same_masks(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mixer-dropout stays off while the LR warms up, then drops; each step's masks are seeded by the run's seed,
    rank and step (on CUDA too, whose generator the checkpoint does not hold), so a run killed after a checkpoint and
    resumed exports the weights of an unbroken one."""
    from apmpipe.stages.apm import APM
    from apmpipe.stages.train import seed_dropout

    draws = []
    for seed, rank, step in [(0, 0, 7), (0, 0, 7), (0, 0, 8), (0, 1, 7), (1, 0, 7)]:
        seed_dropout(seed, rank, step)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1]) and not any(torch.equal(draws[0], d) for d in draws[2:])

    switched: list[bool] = []
    drop_in_mixer = APM.drop_in_mixer

    def recorded(model: APM, active: bool) -> None:
        switched.append(active)
        drop_in_mixer(model, active)

    monkeypatch.setattr(APM, "drop_in_mixer", recorded)
    mixer = ["--mixer-blocks", "1", "--mixer-width", "32", "--warmup-steps", "2", "--max-steps", "8"]
    args = ["train", tiny_cache, *TRAIN_FAST, *mixer, "--checkpoint-every", "2"]
    run = tmp_path / "run"
    assert run_cli(*args, "--out", run, "--mixer-dropout", "0.5").exit_code == 0
    assert switched == [False] * 2 + [True] * 6
    unbroken = load_student(run)
    assert unbroken[1]["model_config"]["mixer_dropout"] == 0.5
    shutil.rmtree(run / "checkpoints" / "step-00000008")  # as if killed after the step-6 checkpoint
    (run / "student.safetensors").unlink()
    assert run_cli(*args, "--out", run, "--mixer-dropout", "0.5", "--resume").exit_code == 0
    assert all(torch.equal(unbroken[0][name], weight) for name, weight in load_student(run)[0].items())
    undropped = tmp_path / "undropped"
    assert run_cli(*args, "--out", undropped, "--mixer-dropout", "0").exit_code == 0
    assert not all(torch.equal(unbroken[0][name], weight) for name, weight in load_student(undropped)[0].items())


def test_resume_keeps_the_runs_own_student_after_the_preset_changed(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started under an older release's preset resumes as that student, exactly, with unset options."""
    from apmpipe.stages.apm import PRESETS

    run = tmp_path / "run"
    args = ["train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "4", "--checkpoint-every", "2"]
    with monkeypatch.context() as release:  # the release the run started under had another "tiny" student
        release.setitem(PRESETS, "tiny", {**PRESETS["tiny"], "hidden": (96, 96), "trunk": "residual"})
        assert run_cli(*args).exit_code == 0
    uninterrupted = load_student(run)
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    (run / "student.safetensors").unlink()
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    resumed = load_student(run)
    assert resumed[1]["model_config"] == uninterrupted[1]["model_config"]
    assert resumed[1]["model_config"]["hidden"] == [96, 96] and resumed[1]["model_config"]["trunk"] == "residual"
    assert all(torch.equal(uninterrupted[0][name], resumed[0][name]) for name in uninterrupted[0])
    # an architecture option given now is compared with what the run's student was built with, not with "unset"
    assert run_cli(*args, "--resume", "--trunk", "residual", "--hidden", "96,96").exit_code == 0
    refused = run_cli(*args, "--resume", "--trunk", "mlp")
    assert refused.exit_code == 2 and "--trunk mlp (run: residual)" in refused.output, refused.output
    # a width that builds the same student is no change: a one-layer filter has no inner width, a student without a
    # mixer no mixer width; 63 rounds up to 64
    same = ["--filter-width", "16", "--pos-dim", "63", "--mixer-width", "64"]
    assert run_cli(*args, "--resume", *same).exit_code == 0
    refused = run_cli(*args, "--resume", "--pos-dim", "32")
    assert refused.exit_code == 2 and "--pos-dim 32 (run: 64)" in refused.output, refused.output
    refused = run_cli(*args, "--resume", "--mixer-blocks", "1")
    assert refused.exit_code == 2 and "--mixer-blocks 1 (run: 0)" in refused.output, refused.output
