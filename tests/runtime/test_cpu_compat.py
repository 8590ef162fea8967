"""The CPU compatibility layer is pinned to the megatron-core release it was written for."""
import subprocess
import sys

import pytest

from opd_megatron.runtime import cpu_compat


def test_installed_megatron_core_is_the_supported_release():
    from megatron.core import package_info

    assert package_info.__version__ == cpu_compat.SUPPORTED_MEGATRON_CORE
    cpu_compat.check_megatron_version()


def test_other_release_fails_loudly(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.19.0")
    with pytest.raises(RuntimeError, match="written for megatron-core==0.16.1, found 0.19.0"):
        cpu_compat.check_megatron_version()


def test_layer_rewrites_cuda_requests_in_a_subprocess():
    """Activation patches the whole process, so it is exercised in a child interpreter."""
    code = (
        "import torch\n"
        "from opd_megatron.runtime import cpu_compat\n"
        "assert cpu_compat.activate()\n"
        "t = torch.zeros(2, device='cuda')\n"
        "assert t.device.type == 'cpu'\n"
        "assert t.cuda().device.type == 'cpu' and t.to('cuda').device.type == 'cpu'\n"
        "assert torch.ones(1, device=torch.cuda.current_device()).device.type == 'cpu'\n"
        "assert t.type() == 'torch.cuda.FloatTensor'\n"
        "from megatron.core.tensor_parallel.random import get_cuda_rng_tracker\n"
        "tracker = get_cuda_rng_tracker(); tracker.add('x', 3)\n"
        "before = torch.get_rng_state()\n"
        "with tracker.fork('x'): a = torch.rand(3)\n"
        "with tracker.fork('x'): b = torch.rand(3)\n"
        "assert torch.equal(torch.get_rng_state(), before) and not torch.equal(a, b)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
