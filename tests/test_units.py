"""Unit tests where the logic is subtle: token encodings, layer indices, position codes, the epoch plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apmpipe.stages.apm import location_codes
from apmpipe.stages.teacher import resolve_layers
from apmpipe.stages.token_metrics import min_token_cosine
from apmpipe.storage.errors import CacheError, ConfigError
from apmpipe.storage.token_codecs import decode_tokens, encode_tokens


def test_float16_overflow_fails_with_a_hint() -> None:
    tokens = np.array([[[1.0, 70000.0]]], dtype=np.float32)
    with pytest.raises(CacheError, match="use --dtype float32"):
        encode_tokens(tokens, "float16")
    np.testing.assert_array_equal(decode_tokens(encode_tokens(tokens, "float32").values), tokens)


def test_int8_is_per_token_symmetric_and_close() -> None:
    rng = np.random.default_rng(0)
    tokens = (rng.standard_normal((4, 5, 64)) * rng.uniform(0.01, 100, (4, 5, 1))).astype(np.float32)
    tokens[0, 0] = 0.0  # an all-zero token stays zero
    encoded = encode_tokens(tokens, "int8")
    assert encoded.values.dtype == np.int8 and encoded.scale.shape == (4, 5)
    decoded = decode_tokens(encoded.values, encoded.scale)
    assert np.abs(decoded - tokens).max(axis=-1).max() <= (np.abs(tokens).max(-1) / 127 / 2 + 1e-6).max()
    assert (decoded[0, 0] == 0).all()
    cosine = (decoded * tokens).sum(-1)[1:] / (np.linalg.norm(decoded, axis=-1) * np.linalg.norm(tokens, axis=-1))[1:]
    assert cosine.min() > 0.999
    with pytest.raises(CacheError):
        encode_tokens(np.array([[[np.nan, 1.0]]], dtype=np.float32), "int8")


def test_min_token_cosine_is_the_worst_token_and_skips_all_zero_ones() -> None:
    a = np.array([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]], dtype=np.float32)
    b = np.array([[[3.0, 0.0], [1.0, 1.0], [5.0, 5.0]]], dtype=np.float32)  # cosines 1, 1/sqrt(2), zero token
    assert min_token_cosine(a, b) == pytest.approx(2**-0.5)
    assert min_token_cosine(a, a) == pytest.approx(1.0)


def test_layers_are_one_based_with_negative_from_the_end() -> None:
    assert resolve_layers((4, 8, -1), 12, "m") == (4, 8, 12)
    assert resolve_layers((-12, 1), 12, "m") == (1,)
    for bad in (0, 13, -13):
        with pytest.raises(ConfigError):
            resolve_layers((bad,), 12, "m")


def test_location_codes_are_distinct_and_fixed() -> None:
    codes = location_codes(prefix_tokens=5, grid=(4, 6), dim=32)
    assert codes.shape == (5 + 24, 32)
    assert torch.cdist(codes, codes).add(torch.eye(29) * 10).min() > 1e-3
    assert torch.equal(codes, location_codes(5, (4, 6), 32))


def test_student_handles_inputs_that_do_not_tile_the_grid() -> None:
    from apmpipe.stages.apm import APM, APMConfig
    from apmpipe.stages.objectives import rgb_loss

    config = APMConfig(
        in_chans=1, image_size=(230, 224), grid=(16, 16), prefix_tokens=2, level_dims=(24, 40), hidden=(32,)
    )
    model = APM(config)
    images = torch.randn(2, 1, 230, 224)
    out = model(images)
    assert [tuple(t.shape) for t in out["tokens"]] == [(2, 258, 24), (2, 258, 40)]
    assert config.tiled_size == (224, 224) and torch.isfinite(rgb_loss(model, out["rgb"], images, None))
    locations = torch.tensor([[0, 5, 257], [1, 2, 3]])
    assert [tuple(t.shape) for t in model(images, locations)["tokens"]] == [(2, 3, 24), (2, 3, 40)]
    chunked = model.predict_tokens(images, chunk=7)
    torch.testing.assert_close(chunked[1], out["tokens"][1].detach(), rtol=1e-5, atol=1e-5)


def test_forward_head_reads_the_head_of_the_level_asked_for() -> None:
    from apmpipe.stages.apm import APM, APMConfig

    model = APM(
        APMConfig(in_chans=1, image_size=(32, 32), grid=(4, 4), prefix_tokens=1, level_dims=(24, 40), hidden=(32,))
    )
    images = torch.randn(2, 1, 32, 32)
    features = model.forward_features(images)
    per_level = model.forward_head(features)
    assert [t.shape[-1] for t in per_level] == [24, 40]
    for level, expected in enumerate(per_level):  # level k: heads[k], its own width (not heads[0]'s)
        (only,) = model.forward_head(features, level=level)
        torch.testing.assert_close(only, expected)


def test_rendered_digits_depend_only_on_seed_and_index() -> None:
    from apmpipe.pipeline.datasets import glyph_images

    images, labels = glyph_images(12, seed=3)
    part, part_labels = glyph_images(4, start=8, seed=3)
    assert images.shape == (12, 32, 32) and images.dtype == np.uint8 and labels.tolist() == [*range(10), 0, 1]
    np.testing.assert_array_equal(part, images[8:])
    np.testing.assert_array_equal(part_labels, labels[8:])
    assert not np.array_equal(glyph_images(4, start=8, seed=4)[0], part)  # another seed, other images
    assert len({image.tobytes() for image in images}) == 12 and images.std() > 20  # distinct, not blank


def test_local_read_gives_each_location_its_own_cell_and_prefix_zeros() -> None:
    from apmpipe.stages.apm import local_read, patch_pixels

    images = torch.randn(2, 3, 12, 8)  # a 3x2 grid of 4x4 cells, one prefix token
    every = local_read(images, (3, 2), 1, None)
    assert every.shape == (2, 7, 48) and not every[:, 0].any()
    torch.testing.assert_close(every[:, 1:], patch_pixels(images, (4, 4)))
    torch.testing.assert_close(every[0, 4], images[0, :, 4:8, 4:8].reshape(-1))  # token 4 = cell (1, 1)
    shared, per_image = torch.tensor([4, 0]), torch.tensor([[6, 1], [0, 4]])
    torch.testing.assert_close(local_read(images, (3, 2), 1, shared), every[:, [4, 0]])
    picked = local_read(images, (3, 2), 1, per_image)
    torch.testing.assert_close(picked, torch.stack([every[0, [6, 1]], every[1, [0, 4]]]))
    response = torch.randn(2, 5, 3, 2)  # a filter's map: one value per cell and channel
    torch.testing.assert_close(local_read(response, (3, 2), 0, torch.tensor([3]))[:, 0], response[:, :, 1, 1])


def test_a_local_query_reads_its_cell_and_old_students_load_as_paper() -> None:
    from apmpipe.stages.apm import APM, APMConfig

    base = APMConfig(in_chans=1, image_size=(32, 32), grid=(4, 4), prefix_tokens=1, level_dims=(24,), hidden=(32,))
    saved = base.to_dict()
    assert "query" not in saved  # a paper student saves what students saved before the field existed
    assert APMConfig.from_dict(saved).query == "paper" and APMConfig.from_dict({**saved, "query": "local"}) != base
    with pytest.raises(ConfigError, match="--query 'near'"):
        APMConfig.from_dict({**saved, "query": "near"})
    local = APM(APMConfig.from_dict({**saved, "query": "local"}))
    assert local.trunk.layers[0].in_features == APM(base).trunk.layers[0].in_features + 64  # one 8x8 cell
    images = torch.randn(2, 1, 32, 32)
    changed = images.clone()
    changed[:, :, 8:16, 16:24] += 1.0  # cell (1, 2): token 1 + 6
    with torch.no_grad():
        local.filter.weight.zero_()  # T ignores the pixels: only the local read can see the change
        before, after = (local(x)["tokens"][0] for x in (images, changed))
    moved = (after - before).abs().amax(-1).amax(0)
    assert moved[7] > 0 and moved.clone().index_fill_(0, torch.tensor([7]), 0).abs().max() == 0


def test_a_layered_filter_reads_each_cell_alone_and_one_layer_saves_as_before() -> None:
    from apmpipe.stages.apm import APM, APMConfig

    base = APMConfig(
        in_chans=1, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8,), pos_dim=8, hidden=(16,)
    )
    assert "filter_layers" not in base.to_dict() and APMConfig.from_dict(base.to_dict()) == base
    layered = APMConfig.from_dict({**base.to_dict(), "trigger_channels": 3, "filter_layers": 3, "filter_width": 5})
    assert APMConfig.from_dict(layered.to_dict()) == layered and layered.filter_widths == (5, 5, 3)
    with pytest.raises(ConfigError, match="--filter-layers"):
        APMConfig.from_dict({**base.to_dict(), "filter_layers": 0})
    torch.manual_seed(0)
    model = APM(layered)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [5, 5, 3]
    images = torch.randn(2, 1, 16, 16)
    changed = images.clone()
    changed[:, :, 4:8, 8:12] += 1.0  # cell (1, 2)
    with torch.no_grad():
        moved = (model.trigger_map(changed) - model.trigger_map(images)).abs().amax((0, 1))
    others = moved.clone()
    others[1, 2] = 0
    assert moved[1, 2] > 0 and others.max() == 0  # only the changed cell's features move
    cells, pixels = 16, 16
    extra = cells * ((5 - 1) * pixels + 5 * 5 + 5 * 3) + (3 - 1) * cells * 16  # wider first conv, 1x1s, T 3x as wide
    assert model.flops_per_image() - APM(base).flops_per_image() == 2 * extra


def test_a_residual_trunk_and_learned_codes_save_only_when_chosen() -> None:
    from apmpipe.stages.apm import APM, APMConfig
    from apmpipe.stages.train import TrainConfig, make_optimizer

    base = APMConfig(
        in_chans=1, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8,), pos_dim=8, hidden=(16, 16, 16)
    )
    assert not {"trunk", "pos_code"} & set(base.to_dict()) and "codes" not in APM(base).state_dict()
    chosen = APMConfig.from_dict({**base.to_dict(), "trunk": "residual", "pos_code": "learned"})
    assert APMConfig.from_dict(chosen.to_dict()) == chosen
    with pytest.raises(ConfigError, match="--pos-code 'sincos' is not one of fixed, learned"):
        APMConfig.from_dict({**base.to_dict(), "pos_code": "sincos"})
    torch.manual_seed(0)
    model = APM(chosen)
    trunk, x = model.trunk, torch.randn(5, 16)
    linears, norms = trunk.layers[::2], trunk.norms
    h = x + linears[1](F.gelu(norms[0](x)))
    h = h + linears[2](F.gelu(norms[1](h)))
    torch.testing.assert_close(trunk.after_first(x), F.gelu(norms[2](h)))
    narrowing = APM(APMConfig.from_dict({**chosen.to_dict(), "hidden": (16, 16, 8)})).trunk  # the last layer: no skip
    lin, ln = narrowing.layers[::2], narrowing.norms
    torch.testing.assert_close(
        narrowing.after_first(x), F.gelu(ln[2](lin[2](F.gelu(ln[1](x + lin[1](F.gelu(ln[0](x))))))))
    )
    optimizer, _ = make_optimizer(model, TrainConfig(caches=("c",), out="o", lr=1e-3), 10, torch.device("cpu"))
    decayed, exempt = (group["params"] for group in optimizer.param_groups)
    assert any(p is model.codes for p in exempt) and not any(p is model.codes for p in decayed)
    assert optimizer.defaults["fused"]  # one kernel per step on a CPU too
    start = model.codes.detach().clone()
    with torch.no_grad():
        model.codes.add_(1.0)
        norms[0].weight.zero_()
    model.reset_parameters(seed=1)
    assert torch.equal(model.codes, start) and torch.equal(norms[0].weight, torch.ones(16))
    assert set(model.state_dict()) - set(APM(base).state_dict()) == {"codes"} | {
        f"trunk.norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    }


class _ReadThreadsProbe(torch.utils.data.IterableDataset):
    """Yields what :func:`read_threads` answers for local and in-memory caches, and zarr's pool size after it."""

    def __iter__(self):  # noqa: ANN204
        import zarr

        from apmpipe.storage.stream import read_threads

        yield (
            read_threads(["memory://cache.zarr"]),
            read_threads(["/tmp/cache.zarr"]),
            zarr.config.get("threading.max_workers"),
        )


def test_loader_workers_on_local_caches_decode_on_their_own_thread() -> None:
    from apmpipe.storage.stream import READ_THREADS

    assert next(iter(_ReadThreadsProbe()))[:2] == (READ_THREADS, READ_THREADS)  # this process: thread pools kept
    ((remote, local, pool),) = list(torch.utils.data.DataLoader(_ReadThreadsProbe(), batch_size=None, num_workers=1))
    assert (remote, local, pool) == (READ_THREADS, 1, 1)


@pytest.mark.parametrize(
    "layout",
    [
        {"level_mode": "query"},  # one grid, the level's code in the query
        {"level_grids": ((4, 4), (2, 2)), "level_prefix_tokens": (1, 0)},  # a ConvNet's levels on two grids
        {"mixer_blocks": 1, "mixer_width": 32},  # T the mixed cells' mean, each query also reading its mixed cell
        {"mixer_blocks": 1, "mixer_width": 32, "trigger_cells": 2},  # T the mean, then 2 channels of every cell
        {"mixer_blocks": 1, "mixer_width": 32, "level_grids": ((4, 4), (2, 2)), "level_prefix_tokens": (1, 0)},
    ],
)
def test_the_first_layer_by_shares_equals_the_layer_on_the_joined_query(layout: dict) -> None:
    from apmpipe.stages.apm import APM, APMConfig, local_read

    config = APMConfig(
        in_chans=2, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8, 8), trigger_channels=3,
        pos_dim=16, hidden=(32, 16), query="local", **layout,
    )  # fmt: skip
    torch.manual_seed(0)
    model = APM(config)
    images = torch.randn(3, 2, 16, 16)
    trigger, maps = model.read(images)
    mixed = model.mixer(model.trigger_map(images)) if config.mixer_blocks else None
    cells = model.filter(images)
    expected_trigger = (
        cells.flatten(1)
        if mixed is None
        else torch.cat([mixed.mean((2, 3)), cells[:, : config.trigger_cells].flatten(1)], dim=1)
    )
    torch.testing.assert_close(trigger, expected_trigger)
    for level in (0, 1):
        grid, prefix = config.grids[level], config.prefixes[level]
        start, stop = model.code_spans[0 if config.one_grid else level]
        count = stop - start
        many = torch.randint(0, count, (3, count + 2))  # more queried codes than the table: the table is projected
        for where in (None, torch.tensor([count - 1, 0]), torch.tensor([[1], [0], [count - 1]]), many):
            codes = model.codes[start:stop] if where is None else model.codes[start:stop][where]
            codes = codes.expand(3, *codes.shape[-2:])
            parts = [trigger[:, None].expand(-1, codes.shape[1], -1), codes]
            if config.level_mode == "query":
                parts.append(model.level_codes[level].expand(3, codes.shape[1], -1))
            parts.append(local_read(images, grid, prefix, where, config.patch_size))
            if mixed is not None:  # one value per cell, area-averaged onto a coarser level's grid
                parts.append(local_read(mixed, grid, prefix, where, (1, 1)))
            joined = model.trunk.layers[0](torch.cat(parts, dim=-1))
            weights = model.first_weights()
            share = model.trigger_share(trigger, weights)
            torch.testing.assert_close(model.first_layer(share, weights, where, level, maps), joined)


def test_the_default_preset_mixes_the_cells_of_one_grid_teacher_queried_locally() -> None:
    """The small preset's mixer block applies to a ViT-like layout with --query local; a hierarchical layout (its
    cost there unmeasured) and a paper query get none unless --mixer-blocks is given."""
    from apmpipe.stages.apm import config_for_cache
    from apmpipe.storage.format import CacheSpec, LevelLayout

    def spec(*grids: tuple[int, int]) -> CacheSpec:
        levels = tuple(LevelLayout(i + 1, 1, grid, 16) for i, grid in enumerate(grids))
        return CacheSpec(teacher={}, data_config={"input_size": [1, 32, 32]}, levels=levels, final_norm=False,
                         num_classes=0)  # fmt: skip

    vit, convnet = spec((8, 8), (8, 8)), spec((8, 8), (4, 4))
    assert config_for_cache(vit, query="local").mixer_blocks == 1
    assert config_for_cache(vit, query="paper").mixer_blocks == 0
    assert config_for_cache(vit).mixer_blocks == 1  # the query left unset: train's default, local
    assert config_for_cache(convnet, query="local").mixer_blocks == 0
    assert config_for_cache(convnet, query="local", mixer_blocks=2).mixer_blocks == 2
    assert config_for_cache(vit, "tiny", query="local").mixer_blocks == 0


def test_a_cell_mixer_lets_every_cell_inform_every_query_and_saves_only_when_chosen() -> None:
    from apmpipe.stages.apm import APM, APMConfig
    from apmpipe.stages.train import TrainConfig, make_optimizer

    base = APMConfig(
        in_chans=1, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8,), pos_dim=8, hidden=(16,),
        query="local", trigger_channels=3,
    )  # fmt: skip
    assert not {"mixer_blocks", "mixer_width"} & set(base.to_dict())
    mixed = APMConfig.from_dict({**base.to_dict(), "mixer_blocks": 2, "mixer_width": 64})
    assert APMConfig.from_dict(mixed.to_dict()) == mixed and mixed.trigger_dim == 64 and mixed.local_dim == 16 + 64
    with pytest.raises(ConfigError, match="--mixer-blocks needs --query local"):
        APMConfig.from_dict({**mixed.to_dict(), "query": "paper"})
    with pytest.raises(ConfigError, match="--mixer-width must be a multiple of 32, got 48"):
        APMConfig.from_dict({**mixed.to_dict(), "mixer_width": 48})
    assert "trigger_cells" not in mixed.to_dict()  # a student saved before --trigger-cells loads as the mean alone
    with pytest.raises(ConfigError, match="--trigger-cells needs a cell mixer"):
        APMConfig.from_dict({**base.to_dict(), "trigger_cells": 1})
    with pytest.raises(ConfigError, match="--trigger-cells 4 is more than the filter's 3 channels"):
        APMConfig.from_dict({**mixed.to_dict(), "trigger_cells": 4})
    assert APMConfig.from_dict({**mixed.to_dict(), "trigger_cells": 2}).trigger_dim == 64 + 2 * 16
    torch.manual_seed(0)
    model = APM(mixed).eval()
    images = torch.randn(2, 1, 16, 16)
    changed = images.clone()
    changed[:, :, 12:16, 12:16] += 1.0  # the last cell only
    with torch.no_grad():  # a query at the first cell reads the change through the mixed cells, T and its own read
        moved = (model(changed, torch.tensor([1]))["tokens"][0] - model(images, torch.tensor([1]))["tokens"][0]).abs()
        _, maps = model.read(images)
    assert moved.max() > 0 and maps[1].shape == (2, 64, 4, 4)
    blocks = 2 * (8 * 16 * 64 * 64 + 2 * 16 * 16 * 64)  # qkv, projection and MLP per cell; attention's two products
    mixer = 16 * 3 * 64 + blocks
    first = (64 - 3 * 16) * 16 + 17 * 64 * 16  # T 64 wide, not 48 (once per image); 64 more inputs in all 17 queries
    assert model.flops_per_image() - APM(base).flops_per_image() == 2 * (mixer + first)
    config = TrainConfig(caches=("c",), out="o", batch_size=8, lr=1e-3)
    optimizer, _ = make_optimizer(model, config, 10, torch.device("cpu"))
    undecayed = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert id(model.mixer.pos) in undecayed and id(model.mixer.embed.weight) not in undecayed
    before = {name: p.detach().clone() for name, p in model.mixer.named_parameters()}
    model.reset_parameters(seed=1)
    changed = {name for name, p in model.mixer.named_parameters() if not torch.equal(p, before[name])}
    assert {"pos", "blocks.0.self_attn.in_proj_weight", "blocks.1.linear2.weight"} <= changed
    assert 0.015 < float(model.mixer.pos.detach().std()) < 0.025


def test_mixer_dropout_acts_only_while_training_and_needs_a_mixer() -> None:
    """--mixer-dropout drops inside the mixer's blocks in train mode alone; a student saved without it loads with none,
    and asking for it without a mixer (or at 1, which drops everything) is refused, not ignored."""
    from apmpipe.stages.apm import APM, APMConfig

    mixed = APMConfig(
        in_chans=1, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8,), pos_dim=8, hidden=(16,),
        query="local", trigger_channels=3, mixer_blocks=1, mixer_width=32,
    )  # fmt: skip
    assert "mixer_dropout" not in mixed.to_dict() and mixed.mixer_dropout == 0.0
    dropping = APMConfig.from_dict({**mixed.to_dict(), "mixer_dropout": 0.5})
    assert APMConfig.from_dict(dropping.to_dict()).mixer_dropout == 0.5
    with pytest.raises(ConfigError, match="--mixer-dropout needs a cell mixer"):
        APMConfig.from_dict({**mixed.to_dict(), "mixer_blocks": 0, "mixer_dropout": 0.1})
    with pytest.raises(ConfigError, match="--mixer-dropout must be between 0 and 0.9, got 1.0"):
        APMConfig.from_dict({**mixed.to_dict(), "mixer_dropout": 1.0})
    torch.manual_seed(0)
    model = APM(dropping)
    cells = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        first, second = model.mixer(cells), model.mixer(cells)  # two draws of the dropout masks
        model.eval()
        kept = model.mixer(cells)
    assert not torch.allclose(first, second) and torch.equal(kept, model.mixer(cells))
    plain = APM(mixed).eval()
    plain.load_state_dict(model.state_dict())  # the same weights: dropout adds no parameter
    assert torch.allclose(plain.mixer(cells), kept, atol=1e-6)
    model.train().drop_in_mixer(False)  # train's warmup and test-time training: train mode, no dropout
    with torch.no_grad():
        assert torch.allclose(model.mixer(cells), kept, atol=1e-6)
        model.drop_in_mixer(True)
        assert not torch.allclose(model.mixer(cells), kept, atol=1e-6)


def test_test_time_training_of_a_dropout_student_is_seeded_per_sample() -> None:
    """TTT keeps the mixer's dropout off (its few steps on one image are like a run's first steps), so an episode
    depends on the sample's seed alone, as for a student without dropout."""
    from apmpipe.stages.apm import APM, APMConfig
    from apmpipe.stages.objectives import LossConfig
    from apmpipe.stages.ttt import EpisodicTTT, TTTConfig

    config = APMConfig(
        in_chans=1, image_size=(16, 16), grid=(4, 4), prefix_tokens=1, level_dims=(8,), pos_dim=8, hidden=(16,),
        query="local", trigger_channels=3, mixer_blocks=1, mixer_width=32, mixer_dropout=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = APM(config)
    images, tokens = torch.randn(1, 1, 16, 16), [torch.randn(1, 17, 8)]
    ttt = EpisodicTTT(model, LossConfig(), TTTConfig(steps=3, lr=1e-3, locations=2))
    first, again = ttt.adapt(1, images, tokens, None), ttt.adapt(1, images, tokens, None)
    assert first.loss_after < first.loss_before
    assert all(torch.equal(a, b) for a, b in zip(first.after, again.after, strict=True))


def test_warmup_takes_the_steps_asked_for_up_to_a_quarter_of_the_run() -> None:
    """A short run (the quick demo's 150 steps) warms up for a quarter of it, not 5 %: the mixer student's first
    steps at the full LR set it back (docs/train.md, "Warmup"); runs of 800 steps and more get all 200."""
    from apmpipe.stages.train import TrainConfig, lr_at, warmup_for

    config = TrainConfig(caches=("c.zarr",), out="r")
    assert [warmup_for(total, config) for total in (4, 150, 799, 800, 2000, 4030)] == [1, 37, 199, 200, 200, 200]
    warmup = warmup_for(150, config)
    assert lr_at(warmup - 1, 150, warmup) == 1.0 and lr_at(0, 150, warmup) == pytest.approx(1 / 37)
