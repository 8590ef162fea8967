"""The benchmark compares like with like: NeMo-RL's vendored renormalised top-k KLs equal our
`topk_*_norm` objectives with support=teacher, in value and gradient, at TP=2."""
from pathlib import Path

from tests.launch import last_json, torchrun

WORKER = Path(__file__).parent / "workers" / "nemo_rl_peer_worker.py"


def test_vendored_nemo_rl_matches_our_renormalised_objectives():
    errors = last_json(torchrun(WORKER, 2, timeout=300).stdout)
    assert set(errors) == {"forward", "reverse", "mixed"}
    assert max(errors.values()) < 1e-5, errors
