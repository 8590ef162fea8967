"""Score one token sequence with several Megatron checkpoints at one layout (one torchrun launch).

    score_worker.py TP PP IDS DIR [DIR ...]   ->  rank 0 prints {DIR: {logprobs, argmax} | {error}}
A checkpoint whose architecture does not fit the layout reports validate_layout's error instead.
"""
import json
import sys

from opd_megatron.checkpoint.megatron_dist import read_arch
from opd_megatron.cli.score import score_checkpoint
from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import ParallelConfig
from opd_megatron.config.validate import validate_layout
from opd_megatron.runtime import distributed as rd


def main():
    tp, pp, ids, dirs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    ids = [int(i) for i in ids.split(",")]
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    rd.initialize(parallel, seed=0)
    results = {}
    for ckpt in dirs:
        try:
            validate_layout(parallel, read_arch(ckpt), rd.world_size_from_env(), cuda=False,
                            where="score")
        except ConfigError as err:
            results[ckpt] = {"error": str(err)}
            continue
        results[ckpt] = score_checkpoint(ckpt, ids, parallel)
    if rd.is_rank0():
        print(json.dumps(results), flush=True)
    rd.shutdown()


if __name__ == "__main__":
    main()
