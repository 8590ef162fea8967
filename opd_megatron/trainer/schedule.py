"""Forward(-backward) over micro-batches through megatron-core's pipeline schedules.

Every stage (SFT, GRPO, OPD, scoring) goes through `run_microbatches`, so PP and VPP work the same
way everywhere. A loss function sees the last stage's vocab-sharded logits [batch, seq, V/tp] and
returns `(loss_sum, num_tokens, metrics)`; Megatron turns the sum into a global token-mean.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from opd_megatron.runtime.distributed import current_device

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is blocked (Megatron's convention).

    Passed explicitly because megatron-core would otherwise build its default mask on CUDA.
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def model_inputs(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    batch, seq = input_ids.shape
    device = input_ids.device
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq),
        "attention_mask": causal_mask(seq, device),
    }


def run_microbatches(chunks: list[torch.nn.Module], microbatches: list[dict], loss_fn: LossFn,
                     *, forward_only: bool) -> list[dict]:
    """Run every micro-batch (each a dict with at least `input_ids` [b, s]) through the model.

    All micro-batches of one call must share [b, s] (pipeline stages exchange fixed-shape
    activations). Optional `position_ids` [b, s] and `attention_mask` [b, 1, s, s] (True =
    blocked) replace the default positions and causal mask (packed sequences). A micro-batch's optional `model_kwargs` dict goes to every chunk's forward
    (the native rollout engine passes each micro-batch's KV-cache `inference_context` this way).
    Returns the metrics dict of each micro-batch on the last pipeline stage, an empty list
    elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    shape = tuple(microbatches[0]["input_ids"].shape)
    for index, mb in enumerate(microbatches):
        if tuple(mb["input_ids"].shape) != shape:
            raise ValueError(f"micro-batch {index} has input_ids shape "
                             f"{tuple(mb['input_ids'].shape)}, expected {shape}")
    device = current_device()

    def loss_wrapper(mb: dict, output: torch.Tensor):
        loss_sum, num_tokens, metrics = loss_fn(output, mb)
        return loss_sum, num_tokens.to(torch.int), metrics

    def forward_step(data_iterator, model):
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in next(data_iterator).items()}
        inputs = {**model_inputs(mb["input_ids"]),
                  **{k: mb[k] for k in ("position_ids", "attention_mask") if k in mb}}
        output = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"],
                       **mb.get("model_kwargs", {}))
        return output, partial(loss_wrapper, mb)

    num_chunks = len(chunks)
    iterators = [iter(microbatches) for _ in range(num_chunks)]
    forward_backward = get_forward_backward_func()
    outputs = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if num_chunks > 1 else iterators[0],
        model=chunks if num_chunks > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
    return list(outputs or [])


def forward_outputs(chunks: list[torch.nn.Module], microbatches: list[dict],
                    extract: Callable[[torch.Tensor, dict], object]) -> list:
    """Forward only, without autograd: `extract(logits, mb)` for every micro-batch, on the last
    pipeline stage (an empty list elsewhere).

    megatron's schedules hand the last stage's output only to a loss function; this wraps
    `extract` into one whose loss is a constant zero that nothing reads.
    """
    def loss_fn(output: torch.Tensor, mb: dict):
        return output.new_zeros(()), torch.tensor(1), {"extracted": extract(output, mb)}

    with torch.no_grad():
        outputs = run_microbatches(chunks, microbatches, loss_fn, forward_only=True)
    return [output["extracted"] for output in outputs]
