"""Training checkpoints: weights, optimizer, scheduler, RNG and stage state; atomic and resumable.

    ROOT/latest          symlink to the newest complete checkpoint
    ROOT/iter_0000020/   a complete checkpoint (see megatron_dist.py for the model layout)
        model/                 weights (the conversion tools read this)
        train_state/optimizer  the (distributed) optimizer state, a dist checkpoint
        train_state/rng_rank{r}.pt
        trainer_state.json     iteration, scheduler, data position, stage state

A checkpoint is written under a temporary name and renamed when every rank has finished, so a
crash mid-save leaves the previous newest checkpoint as the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from opd_megatron.checkpoint.hf_io import copy_side_files
from opd_megatron.checkpoint.megatron_dist import (
    load_model,
    model_sharded_state_dict,
    save_model,
    write_metadata,
)
from opd_megatron.trainer.engine import TrainableModel, sub_optimizers

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, newest first (temporary, unfinished ones are
    ignored: trainer_state.json is written last)."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _ITER_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(done, reverse=True)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    done = complete_checkpoints(root)
    return done[0] if done else None


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Megatron's default ('fully_sharded_model_space') is deprecated and rejected by its own
# checkpoint validation in megatron-core 0.16.1, and "fully_reshardable" fails on torch Adam's
# `step` without apex/TE. This format reshards across DP only: resume keeps TP and PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_sharded(model: TrainableModel, is_loading: bool) -> dict:
    return model.optimizer.sharded_state_dict(model_sharded_state_dict(model.chunks),
                                              is_loading=is_loading, metadata=OPTIMIZER_METADATA)


def save_checkpoint(root: str | Path, iteration: int, model: TrainableModel, stage_state: dict,
                    *, keep_last: int, tokenizer_dir: str | Path | None = None,
                    run_record: dict | None = None) -> Path:
    """Collective. Returns the final directory. `run_record` (stages/resume.py) is what a resume
    checks its config against."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final.with_name(f".tmp_{final.name}")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "train_state" / "optimizer").mkdir(parents=True)
    torch.distributed.barrier()
    save_model(model.chunks, tmp)
    dist_checkpointing.save(_optimizer_sharded(model, is_loading=False),
                            str(tmp / "train_state" / "optimizer"))
    torch.save(_rng_state(), tmp / "train_state" / f"rng_rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        write_metadata(tmp, model.arch, iteration=iteration)
        if tokenizer_dir is not None:
            copy_side_files(tokenizer_dir, tmp)
        state = {"iteration": iteration, "scheduler": model.scheduler.state_dict(),
                 "adam_step": _adam_step(model.optimizer), "stage": stage_state,
                 "run": run_record or {}}
        # Written last: its presence is what marks a checkpoint complete.
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _point_latest(Path(root), final)
        _prune(Path(root), keep_last)
    torch.distributed.barrier()
    return final


def _point_latest(root: Path, final: Path) -> None:
    """ROOT/latest -> the newest checkpoint, replaced atomically (recipes chain stages by it)."""
    link = root / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(final.name)
    os.replace(link, root / "latest")


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.iterdir() if _ITER_DIR.match(p.name))
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def _inner_optimizers(optimizer) -> list:
    return [sub.optimizer for sub in sub_optimizers(optimizer)
            if getattr(sub, "optimizer", None) is not None]


def _adam_step(optimizer) -> int | None:
    steps = {int(s["step"]) for inner in _inner_optimizers(optimizer)
             for s in inner.state.values() if "step" in s}
    return steps.pop() if len(steps) == 1 else None


def _set_adam_step(optimizer, step: int | None) -> None:
    """Restore torch Adam's per-parameter `step` (its bias correction).

    megatron-core 0.16.1's dp_reshardable load leaves torch Adam's `step` at the placeholder
    step's value (1); measured: a resumed run then diverges from an uninterrupted one.
    """
    if step is None:
        return
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step))


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors (and Adam `step`) a checkpoint is loaded into.

    With torch's Adam (no apex/TE), megatron's distributed optimizer only knows its state layout
    after one step; it provides a zero-gradient placeholder step for exactly this.
    """
    for sub in sub_optimizers(optimizer):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values"):
            sub._init_optimizer_states_with_dummy_values()
        elif getattr(sub, "init_state_fn", None) is not None:
            sub.init_state_fn(sub.optimizer)


def load_initial_weights(model: TrainableModel, ckpt: str | Path) -> None:
    """Collective. Weights without optimizer state (a converted or earlier-stage checkpoint) into
    a trainable model: the model's parameters, then the optimizer's fp32 main parameters."""
    load_model(model.chunks, ckpt)
    model.reload_main_params()


def load_checkpoint(ckpt: str | Path, model: TrainableModel) -> dict:
    """Collective. Restores weights, optimizer, scheduler and RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    _materialize_optimizer_state(model.optimizer)
    loaded = dist_checkpointing.load(_optimizer_sharded(model, is_loading=True),
                                     str(ckpt / "train_state" / "optimizer"))
    with torch.no_grad():  # fp32 main params are views of the (leaf) model params
        model.optimizer.load_state_dict(loaded)
    _set_adam_step(model.optimizer, state["adam_step"])
    # After the optimizer: its placeholder step above moved the weights. The fp32 main
    # parameters just loaded stay as they are (no `reload_main_params`): in bf16 the model's
    # weights are their rounded copies, and copying those back would drop every sub-ulp update.
    load_model(model.chunks, ckpt)
    model.scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt / "train_state" / f"rng_rank{torch.distributed.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
