"""Load Megatron checkpoints at a TP/PP layout and save them again from there (as training would).

    resave_worker.py TP PP SRC:DST [SRC:DST ...]
"""
import sys

from opd_megatron.checkpoint.megatron_dist import load_model, read_arch, save_model, write_metadata
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.engine import build_frozen


def main():
    tp, pp = int(sys.argv[1]), int(sys.argv[2])
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    rd.initialize(parallel, seed=0)
    for pair in sys.argv[3:]:
        src, dst = pair.split(":")
        arch = read_arch(src)
        chunks = build_frozen(arch, parallel, PrecisionConfig())
        load_model(chunks, src)
        save_model(chunks, dst)
        if rd.is_rank0():
            write_metadata(dst, arch)
    rd.shutdown()


if __name__ == "__main__":
    main()
