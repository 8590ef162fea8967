"""The trainer loop's failure semantics, on a one-rank gloo group with a scripted stage:
skipped steps are never checkpointed, too many in a row stop the run, a preemption signal saves
and leaves after the step it arrives in."""
import os
import signal

import pytest
import torch

from opd_megatron.stages.config import StageConfig
from opd_megatron.stages import loop
from opd_megatron.stages.loop import NonFiniteLossError, run_loop
from opd_megatron.trainer import checkpointing


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    from tests.launch import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


class ScriptedStage:
    """Reports a finite loss; `skipped` steps report what the engine says of a non-finite one;
    a `signal_at` step sends this process a signal while it runs."""

    def __init__(self, skipped=(), signal_at=None, signum=signal.SIGUSR1):
        self.skipped, self.signal_at, self.signum = set(skipped), signal_at, signum

    def step(self, step):
        if step + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)
        return {"loss": 1.0, "skipped_nonfinite": float(step + 1 in self.skipped)}

    def evaluate(self):
        return {}

    def state_dict(self):
        return {}


@pytest.fixture
def saves(monkeypatch):
    # No megatron parallel state in this process: the loop's throughput metric needs the
    # data-parallel size, one here.
    monkeypatch.setattr(loop, "trained_tokens_per_second", lambda metrics: 0.0)
    saved = []

    def record(root, iteration, model, stage_state, *, keep_last, tokenizer_dir=None,
               run_record=None):
        saved.append(iteration)
        return root / f"iter_{iteration:07d}"

    monkeypatch.setattr(checkpointing, "save_checkpoint", record)
    return saved


def config(tmp_path, **trainer):
    cfg = StageConfig(output_dir=str(tmp_path))
    cfg.trainer.tensorboard = False
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def test_a_skipped_step_is_never_checkpointed(tmp_path, saves, capsys):
    cfg = config(tmp_path, steps=4, save_every=1)
    run_loop(cfg, ScriptedStage(skipped={2}), model=None, start_step=0, tokenizer_dir=None)
    assert saves == [1, 3, 4]
    assert "step 2 was skipped (non-finite loss or gradient): no checkpoint written" in \
        capsys.readouterr().out


def test_the_last_step_skipped_leaves_the_previous_checkpoint_latest(tmp_path, saves):
    cfg = config(tmp_path, steps=3, save_every=0)
    run_loop(cfg, ScriptedStage(skipped={3}), model=None, start_step=0, tokenizer_dir=None)
    assert saves == []


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, saves):
    cfg = config(tmp_path, steps=6, save_every=1, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row with a non-finite loss or "
                                                 r"gradient \(step 4\)"):
        run_loop(cfg, ScriptedStage(skipped={3, 4}), model=None, start_step=0,
                 tokenizer_dir=None)
    assert saves == [1, 2]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_preemption_signal_saves_after_its_step_and_stops(tmp_path, saves, capsys, signum):
    previous = signal.getsignal(signum)
    cfg = config(tmp_path, steps=10, save_every=0)
    result = run_loop(cfg, ScriptedStage(signal_at=3, signum=signum), model=None, start_step=0,
                      tokenizer_dir=None)
    assert result["preempted"] == signum.name
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    assert saves == [3]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"preempted by {signum.name} after step 3: checkpoint at "
        f"{tmp_path / 'checkpoints' / 'iter_0000003'}; trainer.resume=auto continues from it")
    assert signal.getsignal(signum) == previous, "the loop left its handler installed"


def test_a_signal_not_configured_is_left_alone(tmp_path, saves):
    cfg = config(tmp_path, steps=2, preempt_signals=["SIGUSR2"])
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append(1))
    try:
        result = run_loop(cfg, ScriptedStage(signal_at=1), model=None, start_step=0,
                          tokenizer_dir=None)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [1] and result["preempted"] is None and saves == [2]
