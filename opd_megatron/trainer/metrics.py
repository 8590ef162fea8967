"""Per-step metrics: JSONL (always), TensorBoard (default on), W&B (when configured), and a
progress bar with the key numbers. Only global rank 0 writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str | None = None, bar_keys: tuple[str, ...] = ("loss",)):
        self.enabled = enabled
        self.bar_keys = bar_keys
        self._tb = self._wandb = self._file = self._bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._file = (out / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.wandb_project is set but wandb is not installed "
                                   "(pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(out))
        self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name or "train",
                         dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        self._bar.set_postfix({k: f"{clean[k]:.4g}" for k in self.bar_keys if k in clean})
        if step > 0:
            self._bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
