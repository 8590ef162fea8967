"""vLLM rollout engine, colocated with training on the same GPUs (GPU only; vllm imported lazily).

Layout: vLLM runs inside the training processes (`distributed_executor_backend=
"external_launcher"`, engine core in-process), one vLLM worker per training rank. vLLM forms its
tensor-parallel groups from consecutive ranks, so `rollout.vllm_tensor_parallel` must divide the
Megatron tensor-parallel size: each vLLM group then sits inside one Megatron model replica, whose
ranks all hold the same prompts. A replica of TP x PP ranks holds TP x PP / vLLM-TP vLLM engines;
they split the prompts and all-gather the rollouts, so every rank of the replica returns the very
same rollouts (separate engines sampling the same prompts need not agree).

Memory: vLLM sleeps (level 1: weights offloaded to CPU, KV cache dropped) while Megatron trains.
A refit wakes the weights only; generation wakes the KV cache. The engine starts from dummy
weights and is refit from the live student before its first generation.

Weights: `generate` refits from the student's chunks unless `update_weights` already did since
the last generation, so an optimizer step in between is never missed. The refit streams through
the checkpoint package's HF mapping (see refit.py) into the worker's `model.load_weights`.

Log-probs: the Rollout contract is log-probs after temperature and before top-k/top-p. vLLM
reports either the raw distribution (before temperature) or the processed one (after temperature
and truncation); `logprobs_mode_for` picks the one that equals the contract for the configured
sampling, and `generate` refuses sampling for which the chosen one would not.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import Rollout, SamplingParams
from opd_megatron.rollout.refit import DEFAULT_BUCKET_BYTES, RefitStats, refit

WEIGHTS, KV_CACHE = "weights", "kv_cache"


class VLLMUnavailableError(RuntimeError):
    pass


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(
            f"rollout.engine=vllm needs vllm, which is not importable here ({err}); use the "
            "docker/Dockerfile image (or install the `gpu` extra) or set rollout.engine=native"
        ) from None
    return vllm


# --- pure mappings between our types and vLLM's -----------------------------------------------

def to_vllm_sampling_kwargs(sampling: SamplingParams,
                            eos_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for `sampling`.

    Log-probs are always requested (at least 1) because every rollout carries the log-prob of
    each sampled token; vLLM returns the top-`logprobs` entries plus the sampled token. The
    tokenizer is not loaded in vLLM, so end-of-sequence ids are passed as stop tokens.
    """
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": sorted({*eos_token_ids, *sampling.stop_token_ids}),
        "seed": sampling.seed,
        "logprobs": max(1, sampling.return_top_k),
        "detokenize": False,
    }


def to_vllm_prompts(prompts: Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """`vllm.inputs.TokensPrompt` dicts: we hand vLLM token ids, never text."""
    return [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts]


def logprobs_mode_for(temperature: float, top_k: int, top_p: float) -> str:
    """The vLLM `logprobs_mode` whose log-probs are the Rollout contract's for this sampling."""
    if top_k == 0 and top_p >= 1.0:
        return "processed_logprobs"   # after temperature; nothing is truncated
    if temperature in (0.0, 1.0):
        return "raw_logprobs"         # temperature 1 (or greedy): raw is the tempered distribution
    raise ValueError(f"vLLM cannot report log-probs of the tempered, untruncated distribution "
                     f"when sampling at temperature={temperature} with top_k={top_k}, "
                     f"top_p={top_p}: use temperature 1.0 or drop top-k/top-p")


def check_logprobs_mode(mode: str, sampling: SamplingParams) -> None:
    """Refuse sampling whose log-probs the engine's `mode` cannot report, unless the caller
    does not read them (`sampling.logprobs=False`, e.g. evaluation)."""
    if not sampling.logprobs:
        return
    truncated = sampling.top_k > 0 or sampling.top_p < 1.0
    ok = (mode == "processed_logprobs" and not truncated) or \
         (mode == "raw_logprobs" and sampling.temperature in (0.0, 1.0))
    if not ok:
        raise ValueError(f"this vLLM engine reports {mode}, which differs from the Rollout "
                         f"log-probs for temperature={sampling.temperature}, "
                         f"top_k={sampling.top_k}, top_p={sampling.top_p}")


def _position_logprobs(position: dict, token: int, top_k: int):
    entry = position[token]
    if not top_k:
        return entry.logprob, None, None
    # The sampled token is an extra entry when it is outside the top-K: keep ranks 1..K.
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank <= top_k)
    ranked = ranked[:top_k]
    return entry.logprob, [tid for _, tid, _ in ranked], [lp for _, _, lp in ranked]


def rollouts_from_vllm(outputs: Sequence[Any], prompt_indices: Sequence[int],
                       return_top_k: int = 0) -> list[Rollout]:
    """Our rollouts from vLLM `RequestOutput`s (request i answers prompt `prompt_indices[i]`),
    prompt-major, samples in vLLM's index order."""
    if len(outputs) != len(prompt_indices):
        raise ValueError(f"{len(outputs)} vLLM outputs for {len(prompt_indices)} prompts")
    rollouts = []
    for request, prompt_index in zip(outputs, prompt_indices, strict=True):
        for completion in sorted(request.outputs, key=lambda c: c.index):
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {request.request_id} finished with "
                                   f"{completion.finish_reason!r}")
            token_ids = [int(t) for t in completion.token_ids]
            if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
                raise RuntimeError(f"vLLM request {request.request_id} returned no per-token "
                                   "log-probs; SamplingParams.logprobs must be >= 1")
            per_token = [_position_logprobs(pos, tok, return_top_k)
                         for pos, tok in zip(completion.logprobs, token_ids, strict=True)]
            rollouts.append(Rollout(
                prompt_index=prompt_index,
                prompt_ids=[int(t) for t in request.prompt_token_ids],
                response_ids=token_ids,
                logprobs=[float(lp) for lp, _, _ in per_token],
                finish_reason=completion.finish_reason,
                top_k_ids=[ids for _, ids, _ in per_token] if return_top_k else None,
                top_k_logprobs=[lps for _, _, lps in per_token] if return_top_k else None,
            ))
    return rollouts


def replica_prompt_indices(num_prompts: int, num_replicas: int, replica: int) -> list[int]:
    """The prompts one vLLM engine of a model replica samples (round robin)."""
    return list(range(replica, num_prompts, num_replicas))


def merge_replica_rollouts(per_replica: Iterable[Sequence[Rollout]]) -> list[Rollout]:
    """Prompt-major rollouts of all engines of a replica (a stable sort keeps sample order)."""
    return sorted((r for rollouts in per_replica for r in rollouts), key=lambda r: r.prompt_index)


@dataclass(frozen=True)
class ReplicaLayout:
    """Where this rank's vLLM engine sits inside its Megatron model replica."""

    num_engines: int = 1
    engine: int = 0
    leader: bool = True            # rank 0 of its vLLM tensor-parallel group
    group: Any = None              # Megatron's model-parallel group (None: a single rank)


def replica_layout(megatron_tp: int, mp_size: int, mp_rank: int, vllm_tp: int,
                   group: Any = None) -> ReplicaLayout:
    if megatron_tp % vllm_tp:
        raise ValueError(f"rollout.vllm_tensor_parallel={vllm_tp} must divide "
                         f"parallel.tensor_parallel={megatron_tp}: vLLM groups consecutive ranks, "
                         "which must hold the same prompts")
    return ReplicaLayout(num_engines=mp_size // vllm_tp, engine=mp_rank // vllm_tp,
                         leader=mp_rank % vllm_tp == 0, group=group)


def write_model_dir(arch: ModelArch, path: str | Path) -> Path:
    """A directory vLLM can start from: the architecture's HF config only (dummy weights are
    replaced by the first refit; no tokenizer is loaded)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(arch.to_hf_dict(), indent=2))
    return path


# --- the engine --------------------------------------------------------------------------------

@dataclass(frozen=True)
class VLLMEngineConfig:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    dtype: str = "bfloat16"
    seed: int = 0
    enforce_eager: bool = False
    logprobs_mode: str = "processed_logprobs"
    sleep_level: int = 1
    refit_bucket_bytes: int = DEFAULT_BUCKET_BYTES


def vllm_engine_kwargs(config: VLLMEngineConfig, model_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for a colocated engine."""
    return {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "load_format": "dummy",
        "generation_config": "vllm",   # no sampling defaults from the model directory
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": config.tensor_parallel_size,
        "enable_sleep_mode": True,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        # All ranks of a vLLM group must draw the same samples.
        "seed": config.seed,
        "enforce_eager": config.enforce_eager,
        "logprobs_mode": config.logprobs_mode,
    }


def engine_config(cfg, arch: ModelArch) -> VLLMEngineConfig:
    """The engine a stage recipe asks for; its log-prob mode is the training rollout's."""
    r = cfg.rollout
    longest = cfg.data.max_seq_length + max(r.max_new_tokens, cfg.eval.max_new_tokens)
    return VLLMEngineConfig(
        tensor_parallel_size=r.vllm_tensor_parallel,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        max_model_len=min(longest, arch.max_position_embeddings),
        dtype="float32" if cfg.precision.precision == "fp32" else "bfloat16",
        seed=cfg.seed,
        logprobs_mode=logprobs_mode_for(r.temperature, r.top_k, r.top_p),
    )


def _megatron_replica_layout(vllm_tp: int) -> ReplicaLayout:
    if not torch.distributed.is_initialized():
        return ReplicaLayout()
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    return replica_layout(ps.get_tensor_model_parallel_world_size(),
                          torch.distributed.get_world_size(group),
                          torch.distributed.get_rank(group), vllm_tp, group)


class VLLMRolloutEngine:
    """RolloutEngine on a colocated vLLM `LLM`.

    Tests pass stand-ins for vLLM's `LLM` (`llm`) and `SamplingParams` (`sampling_params`).
    """

    def __init__(self, config: VLLMEngineConfig, arch: ModelArch, *,
                 chunks: list[torch.nn.Module] | None = None, eos_token_ids: Sequence[int] = (),
                 llm: Any = None, sampling_params: Callable[..., Any] | None = None,
                 layout: ReplicaLayout | None = None):
        self.config, self.arch = config, arch
        self.chunks = chunks
        self.eos_token_ids = tuple(eos_token_ids)
        self.layout = layout or _megatron_replica_layout(config.tensor_parallel_size)
        if llm is None or sampling_params is None:
            vllm = import_vllm()
            sampling_params = sampling_params or vllm.SamplingParams
        if llm is None:
            # The engine core must live in this process for the refit to reach the worker's model.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            model_dir = write_model_dir(arch, tempfile.mkdtemp(prefix="opd-vllm-"))
            llm = vllm.LLM(**vllm_engine_kwargs(config, model_dir))
        self.llm = llm
        self._sampling_params = sampling_params
        self._awake = {WEIGHTS, KV_CACHE}
        self._fresh = False            # refit since the last generation
        self.last_refit: RefitStats | None = None
        # Hand the memory back to Megatron until the first refit.
        self.sleep()

    @classmethod
    def from_config(cls, cfg, arch: ModelArch, tokenizer_dir: str,
                    chunks: list[torch.nn.Module] | None = None) -> "VLLMRolloutEngine":
        """From a stage recipe (opd_megatron.stages.config.StageConfig)."""
        from opd_megatron.data.tokenizer import load_tokenizer

        eos = load_tokenizer(tokenizer_dir).eos_token_id
        return cls(engine_config(cfg, arch), arch, chunks=chunks, eos_token_ids=[eos])

    # --- memory: sleep while Megatron trains -------------------------------------------------

    def _wake(self, *tags: str) -> None:
        missing = [tag for tag in tags if tag not in self._awake]
        if missing:
            # Hand the training step's cached, freed blocks back to the driver first: vLLM
            # allocates its weights and KV cache outside PyTorch's caching allocator.
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=missing)
            self._awake.update(missing)

    def sleep(self) -> None:
        if self._awake:
            self.llm.sleep(level=self.config.sleep_level)
            self._awake.clear()

    # --- RolloutEngine -------------------------------------------------------------------------

    def update_weights(self, chunks: list[torch.nn.Module]) -> None:
        self.chunks = chunks
        self._wake(WEIGHTS)
        bucket_bytes = self.config.refit_bucket_bytes

        def load(model):
            return refit(lambda bucket: model.load_weights(weights=bucket), chunks, self.arch,
                         bucket_bytes)

        # In-process worker: `apply_model` calls `load` with the worker's nn.Module directly.
        self.last_refit = self.llm.apply_model(load)[0]
        # Cached prefixes hold keys/values of the old weights.
        self.llm.reset_prefix_cache()
        self._fresh = True

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        check_logprobs_mode(self.config.logprobs_mode, sampling)
        if not self._fresh:
            if self.chunks is None:
                raise RuntimeError("the vLLM engine has no student weights yet: construct it with "
                                   "chunks= or call update_weights(chunks) before generate")
            self.update_weights(self.chunks)
        self._wake(WEIGHTS, KV_CACHE)
        layout = self.layout
        mine = replica_prompt_indices(len(prompts), layout.num_engines, layout.engine)
        params = self._sampling_params(**to_vllm_sampling_kwargs(sampling, self.eos_token_ids))
        # An engine left without prompts (fewer prompts than engines) has nothing to sample.
        outputs = self.llm.generate(to_vllm_prompts([prompts[i] for i in mine]), params,
                                    use_tqdm=False) if mine else []
        rollouts = rollouts_from_vllm(outputs, mine, sampling.return_top_k)
        if not sampling.logprobs:
            # Not the contract's log-probs: make any reader see it instead of a plausible number.
            for rollout in rollouts:
                rollout.logprobs = [math.nan] * len(rollout.logprobs)
        self.sleep()
        self._fresh = False
        if layout.num_engines == 1:
            return rollouts
        gathered: list = [None] * torch.distributed.get_world_size(layout.group)
        torch.distributed.all_gather_object(gathered, rollouts if layout.leader else None,
                                            group=layout.group)
        return merge_replica_rollouts(r for r in gathered if r is not None)
