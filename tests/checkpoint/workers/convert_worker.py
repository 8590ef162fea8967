"""Convert HF -> Megatron -> HF for every job in a JSON file, in one process (see conftest.py).

Each job: {"hf": dir, "megatron": dir, "hf_out": dir, "force": bool, "fsync": bool}; without
"hf", only the export runs. Prints one JSON line: per job, the largest absolute value in the padding
rows of the Megatron vocabulary tensors.
"""
import json
import sys


def padding_max(megatron_dir: str) -> float:
    from opd_megatron.checkpoint.megatron_dist import load_full_tensors, read_arch

    vocab = read_arch(megatron_dir).vocab_size
    rows = [t[vocab:] for k, t in load_full_tensors(megatron_dir)
            if k in ("embedding.word_embeddings.weight", "output_layer.weight")]
    assert rows and all(r.shape[0] > 0 for r in rows), "expected padded vocabulary rows"
    return max(float(r.abs().max()) for r in rows)


def main():
    import torch

    from opd_megatron.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from opd_megatron.runtime import distributed

    torch.set_num_threads(1)
    jobs = json.loads(open(sys.argv[1]).read())
    report = {}
    for name, job in jobs.items():
        if "hf" in job:
            convert_hf_to_megatron(job["hf"], job["megatron"], force=job.get("force", False),
                                   fsync=job.get("fsync", False), progress=False)
        convert_megatron_to_hf(job["megatron"], job["hf_out"], max_shard_size="50KB",
                               fsync=job.get("fsync", False), progress=False)
        report[name] = {"padding_max": padding_max(job["megatron"])}
    distributed.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
