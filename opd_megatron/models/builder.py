"""Build megatron-core GPTModel chunks for this rank from a `ModelArch`.

Must run after `opd_megatron.runtime.initialize` (it reads Megatron's parallel state).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.models.precision import DeviceCaps, PrecisionPlan, plan_precision


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse RoPE frequencies exactly as transformers computes them (default and llama3).

    Megatron's built-in llama3 scaling hard-codes low/high frequency factors and the original
    context length, so the frequencies are always set from the HF config instead.
    """
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# `trainer.recompute` as megatron-core's activation-recompute options: selective recomputes core
# attention (megatron's default module list), full recomputes every transformer layer's input.
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}


def transformer_config(arch: ModelArch, parallel: ParallelConfig, plan: PrecisionPlan,
                       *, initialize: bool = True, recompute: str = "none",
                       fp8_first_last_layers_bf16: bool = False):
    """megatron-core's TransformerConfig; `fp8_first_last_layers_bf16` (precision.*) keeps the
    first and last transformer layer of the model out of FP8 when the plan has an FP8 recipe."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = plan.params_dtype == torch.bfloat16
    fp8 = {}
    if plan.fp8_recipe is not None:
        fp8 = {"fp8": plan.fp8_format, "fp8_recipe": plan.fp8_recipe,
               "first_last_layers_bf16": fp8_first_last_layers_bf16,
               "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        bf16=bf16,
        fp16=plan.params_dtype == torch.float16,
        params_dtype=plan.params_dtype,
        pipeline_dtype=plan.params_dtype,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=initialize,
        # Fused kernels are CUDA-only; TE brings its own fusions on GPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=_batch_p2p_comm(parallel),
        deallocate_pipeline_outputs=False,
        init_method_std=0.02,
        **fp8,
        **RECOMPUTE[recompute],
    )


def _batch_p2p_comm(parallel: ParallelConfig) -> bool:
    if parallel.batch_p2p_comm is not None:
        return parallel.batch_p2p_comm
    return torch.cuda.is_available()


def layer_spec(arch: ModelArch, plan: PrecisionPlan):
    from megatron.core.models.gpt import gpt_layer_specs

    if plan.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm,
                                                    normalization="RMSNorm")


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter in `dtype`, as on a GPU.

    The local spec's torch norms are created in fp32 whatever `params_dtype` says, while TE's norms
    (and Megatron-LM's Float16Module) hold them in bf16; the optimizer keeps fp32 main copies either
    way. Buffers stay as they are (RoPE frequencies are not parameters and stay fp32).
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_model_chunks(arch: ModelArch, parallel: ParallelConfig, precision: PrecisionConfig,
                       *, make_vocab_size_divisible_by: int = 128,
                       caps: DeviceCaps | None = None, params_dtype: torch.dtype | None = None,
                       initialize: bool = True, recompute: str = "none") -> list[torch.nn.Module]:
    """This rank's GPTModel chunks: one per virtual pipeline stage (one without VPP).

    `params_dtype` overrides the precision plan's parameter dtype and `initialize=False` leaves the
    weights uninitialised: checkpoint conversion holds weights at the checkpoint's dtype (bf16 on a
    CPU too) and overwrites every one of them, without running the model.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    plan = plan_precision(precision, caps or DeviceCaps.detect())
    if params_dtype is not None:
        plan = dataclasses.replace(plan, params_dtype=params_dtype)
    config = transformer_config(arch, parallel, plan, initialize=initialize, recompute=recompute,
                                fp8_first_last_layers_bf16=precision.fp8_first_last_layers_bf16)
    spec = layer_spec(arch, plan)
    vocab = padded_vocab_size(arch.vocab_size, parallel.tensor_parallel,
                              make_vocab_size_divisible_by)
    num_chunks = parallel.virtual_pipeline_parallel or 1
    chunks = []
    for vp_stage in range(num_chunks):
        vp = vp_stage if parallel.virtual_pipeline_parallel else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp,
        )
        _cast_parameters(model, plan.params_dtype)
        if hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
