"""Worker for the layout-equivalence tests: one invocation per parallel layout (see test_layouts.py)."""
import json
import os
import sys
from pathlib import Path

import torch

from opd_megatron.checkpoint.megatron_dist import load_model, save_model, write_metadata
from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.checkpointing import load_initial_weights
from opd_megatron.trainer.engine import build_trainable
from opd_megatron.trainer.schedule import forward_outputs

ARCH = ModelArch(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96,
                 num_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True, rope_theta=10000.0)
GLOBAL_BATCH, SEQ = 4, 12
LR = 1e-3
# fp32 or bf16 (bf16 parameters, fp32 main parameters in the distributed optimizer).
PRECISION = PrecisionConfig(precision=os.environ.get("LAYOUT_PRECISION", "fp32"))


def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, ARCH.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def gather_vocab(logits):
    from megatron.core import parallel_state as ps
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :ARCH.vocab_size]


def full_logits(chunks, tokens):
    """Logits of every sequence at full vocab, on the last stage (None elsewhere)."""
    mbs = [{"input_ids": tokens[i:i + 1, :-1]} for i in range(tokens.shape[0])]
    out = forward_outputs(chunks, mbs, lambda logits, mb: gather_vocab(logits))
    return torch.cat(out) if out else None


def ce_loss(output, mb):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    labels = mb["labels"]
    shard = output.shape[-1]
    ids = torch.arange(shard) + ps.get_tensor_model_parallel_rank() * shard
    # Padded vocabulary rows differ between layouts (384 at TP1, 512 at TP2): keep them out.
    logits = output.float().masked_fill(ids >= ARCH.vocab_size, -1e4)
    losses = vocab_parallel_cross_entropy(logits, labels)
    return losses.sum(), torch.tensor(labels.numel()), {"loss_sum": losses.sum().detach()}


def real_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Vocabulary-sized weights without their padding rows (padding differs between layouts)."""
    if "word_embeddings" in name or "output_layer" in name:
        return tensor[:ARCH.vocab_size]
    return tensor


def compare_saved_weights(out_dir: Path) -> None:
    """Load every layout's post-step checkpoint at TP1PP1 and diff it against the reference."""
    from opd_megatron.trainer.engine import build_frozen
    rd.initialize(ParallelConfig(), seed=1234)
    reference = build_frozen(ARCH, ParallelConfig(), PRECISION)
    load_model(reference, out_dir / "step_tp1pp1_dp1")
    ref_state = {k: v.clone() for k, v in reference[0].state_dict().items()
                 if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    diffs, moved = {}, {}
    for ckpt in sorted(out_dir.glob("step_*")):
        load_model(reference, ckpt)
        state = reference[0].state_dict()
        deltas = [(real_rows(k, state[k]).float() - real_rows(k, v).float()).abs()
                  for k, v in ref_state.items()]
        diffs[ckpt.name] = max(d.max().item() for d in deltas)
        # Elements off by more than a tenth of one Adam step (lr): bf16 flips the sign of a few
        # near-zero gradients, which Adam's first step turns into +-lr.
        moved[ckpt.name] = sum((d > LR / 10).sum().item() for d in deltas) / sum(
            d.numel() for d in deltas)
    print(json.dumps({"weight_max_diff": diffs, "weight_fraction_off": moved}), flush=True)
    rd.shutdown()


def main():
    if sys.argv[1] == "compare":
        return compare_saved_weights(Path(sys.argv[2]))
    mode, out_dir, tp, pp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    vpp = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "0" else None
    name = f"tp{tp}pp{pp}" + (f"vpp{vpp}" if vpp else "")
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vpp)
    rd.initialize(parallel, seed=1234)
    from megatron.core import parallel_state as ps
    model = build_trainable(ARCH, parallel, PRECISION,
                            OptimizerConfig(lr=LR, clip_grad=1.0, weight_decay=0.1, adam_eps=1e-6), total_steps=10)
    rank = torch.distributed.get_rank()
    if mode == "reference":
        save_model(model.chunks, out_dir / "ref")
        if rank == 0:
            write_metadata(out_dir / "ref", ARCH)
    else:
        load_initial_weights(model, out_dir / "ref")
        if tp == 2 and pp == 1 and ps.get_data_parallel_world_size() == 1:
            save_model(model.chunks, out_dir / "saved_tp2")
            if rank == 0:
                write_metadata(out_dir / "saved_tp2", ARCH)
    tokens = batch()
    result = {"layout": name}
    model.eval()
    logits = full_logits(model.chunks, tokens)
    if (out_dir / "saved_tp2").exists() and mode != "reference" and not (tp == 2 and pp == 1):
        load_model(model.chunks, out_dir / "saved_tp2")
        reloaded = full_logits(model.chunks, tokens)
        if reloaded is not None:
            result["tp2_ckpt_logits_max_diff"] = (reloaded - logits).abs().max().item()
        load_initial_weights(model, out_dir / "ref")
    dp, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank = GLOBAL_BATCH // dp_size
    mine = tokens[dp * per_rank:(dp + 1) * per_rank]
    mbs = [{"input_ids": mine[i:i + 1, :-1], "labels": mine[i:i + 1, 1:]} for i in range(per_rank)]
    metrics, step = model.train_step(mbs, ce_loss)
    model.eval()
    after = full_logits(model.chunks, tokens)
    save_model(model.chunks, out_dir / f"step_{name}_dp{dp_size}")
    is_writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp == 0
    if is_writer:
        torch.save({"before": logits, "after": after, "grad_norm": step["grad_norm"]},
                   out_dir / f"logits_{name}_dp{dp_size}.pt")
        result.update(grad_norm=step["grad_norm"], applied=step["update_applied"])
        print(json.dumps(result), flush=True)
    rd.shutdown()


if __name__ == "__main__":
    main()
