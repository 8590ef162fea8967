"""The shape contract: every recipe in conf/ x random prompt/response lengths gives micro-batches
that Transformer Engine's FP8 GEMMs and megatron's sequence/context parallelism accept."""
import random
from dataclasses import replace
from pathlib import Path

import pytest

from opd_megatron.config.loader import ConfigError, load_config
from opd_megatron.config.validate import validate_layout
from opd_megatron.data.shapes import ShapeContract
from opd_megatron.stages.batching import shifted_microbatches
from opd_megatron.stages.config import StageConfig
from tests.config.test_recipes import QWEN3_1P7B

CONF = Path(__file__).resolve().parents[2] / "conf"
STAGE_RECIPES = sorted(p for p in CONF.glob("*.yaml") if not p.name.startswith("smoke"))


def accepted(cfg: StageConfig, b: int, s: int) -> list[str]:
    """What TE / megatron would assert about a [b, s] micro-batch under `cfg` (empty: none).

    TE (`assert_dim_for_fp8_exec`): an FP8 GEMM input's dims but the last multiply to a multiple
    of 8, the last is a multiple of 16. The GEMM inputs are [s, b, hidden] (under sequence
    parallelism each rank first casts its [s/TP, b, hidden] shard).
    """
    p, failures = cfg.parallel, []
    shard = s
    if p.sequence_parallel:
        if s % p.tensor_parallel:
            failures.append(f"sequence parallelism: s={s} % TP={p.tensor_parallel}")
        shard = s // p.tensor_parallel
    if p.context_parallel > 1 and s % (2 * p.context_parallel):
        failures.append(f"context parallelism: s={s} % 2CP={2 * p.context_parallel}")
    if cfg.precision.precision == "fp8" and (shard * b % 8 or QWEN3_1P7B.hidden_size % 16):
        failures.append(f"FP8: [{shard}, {b}, {QWEN3_1P7B.hidden_size}]")
    return failures


def variants(cfg: StageConfig):
    yield cfg
    if cfg.parallel.tensor_parallel > 1:
        yield replace(cfg, parallel=replace(cfg.parallel, sequence_parallel=True))
    # The contract's CP term, for when batches are split per CP rank (refused until then).
    yield replace(cfg, parallel=replace(cfg.parallel, context_parallel=2))


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.name)
def test_every_recipe_gets_shapes_te_and_megatron_accept(recipe):
    rng = random.Random(recipe.name)
    for cfg in variants(load_config(recipe, StageConfig)):
        shapes = ShapeContract.for_run(cfg.precision, cfg.parallel)
        b = cfg.trainer.micro_batch_size
        for _ in range(50):
            rows = [[5] * rng.randint(1, 40) + [7] * rng.randint(1, 300) for _ in range(b * 2)]
            masks = [[0] + [1] * (len(r) - 1) for r in rows]
            for mb in shifted_microbatches(rows, masks, b, pad_id=0, shapes=shapes):
                assert mb["input_ids"].shape == mb["labels"].shape == mb["loss_mask"].shape
                assert not accepted(cfg, *mb["input_ids"].shape), (recipe.name, cfg.parallel)


def test_padding_is_masked_and_real_tokens_are_kept():
    fp8 = ShapeContract.for_run(replace(StageConfig().precision, precision="fp8"),
                                StageConfig().parallel)
    assert fp8.sequence_multiple == 16
    (mb,) = shifted_microbatches([[1, 2, 3], [4, 5, 6, 7, 8]], [[0, 1, 1], [0, 0, 1, 1, 1]], 2,
                                 pad_id=0, shapes=fp8)
    assert mb["input_ids"].shape == (2, 16)
    assert mb["labels"][1, :4].tolist() == [5, 6, 7, 8] and mb["labels"][0, :2].tolist() == [2, 3]
    assert mb["loss_mask"].sum().item() == 5          # padding is never trained on
    assert mb["loss_mask"][:, 4:].sum().item() == 0


@pytest.mark.parametrize("precision, tp, sp, cp, multiple", [
    ("fp32", 1, False, 1, 1), ("bf16", 2, True, 1, 2), ("fp8", 1, False, 1, 16),
    ("fp8", 2, True, 1, 32), ("bf16", 1, False, 4, 8), ("fp8", 4, True, 2, 64)])
def test_sequence_multiple(precision, tp, sp, cp, multiple):
    cfg = StageConfig()
    shapes = ShapeContract.for_run(
        replace(cfg.precision, precision=precision),
        replace(cfg.parallel, tensor_parallel=tp, sequence_parallel=sp, context_parallel=cp))
    assert shapes.sequence_multiple == multiple
    assert shapes.row_multiple == (16 if precision == "fp8" else 1)


def test_context_parallelism_is_refused_up_front_on_gpu_too():
    parallel = replace(StageConfig().parallel, context_parallel=2)
    with pytest.raises(ConfigError) as err:
        validate_layout(parallel, QWEN3_1P7B, 8, cuda=True, where="conf/x.yaml")
    assert str(err.value) == ("conf/x.yaml: parallel.context_parallel=2 is not supported yet "
                              "(batches are not split per context-parallel rank); use 1")
