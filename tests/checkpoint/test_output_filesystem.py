"""Conversion into a read-only or full file system: one line (exit code 2) saying so, and nothing
half-written left there. Each case runs the tool inside a private mount namespace on a small
tmpfs (`unshare -rm`), so no real disk is filled."""
import shlex
import subprocess
import sys

import pytest

from tests.checkpoint.hf_fixtures import tiny_arch, write_hf
from tests.launch import REPO_ROOT
from tests.user_errors import one_line_error


def _namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _namespaces_available(),
                                reason="needs unshare -rm (user + mount namespaces)")


def convert_on_tmpfs(tool: str, source, mount_options: str, mnt):
    """Run `tool --<source> SRC --out MNT/out` with a tmpfs mounted at MNT; the result and what
    was left on the tmpfs (listed before the namespace, and the mount, go away)."""
    flag = "--hf-dir" if "hf_to" in tool else "--megatron-dir"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o {mount_options} tmpfs {mnt} && "
              f"{shlex.quote(sys.executable)} tools/{tool} {flag} {source} --out {mnt}/out "
              f"--no-progress; rc=$?; ls -A {mnt} > {mnt}.left; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300,
                          env={"PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore",
                               "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return proc, (mnt.parent / f"{mnt.name}.left").read_text().split()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    hf = write_hf(root / "hf", tiny_arch("llama"))
    proc = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf),
                           "--out", str(root / "megatron"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf, root / "megatron"


def weight_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("tool,source", [("convert_hf_to_megatron.py", 0),
                                         ("convert_megatron_to_hf.py", 1)])
def test_disk_full_is_one_line_and_leaves_nothing(checkpoints, tmp_path, tool, source):
    src = checkpoints[source]
    size_kb = weight_bytes(src) // 2 // 1024     # room for half the output
    proc, left = convert_on_tmpfs(tool, src, f"size={size_kb}k", tmp_path / "mnt")
    assert one_line_error(proc) == (f"{tmp_path}/mnt/out: no space left on the device while "
                                    "writing the output (nothing was left behind)")
    assert left == []


@pytest.mark.parametrize("tool,source", [("convert_hf_to_megatron.py", 0),
                                         ("convert_megatron_to_hf.py", 1)])
def test_read_only_output_is_one_line(checkpoints, tmp_path, tool, source):
    proc, left = convert_on_tmpfs(tool, checkpoints[source], "ro", tmp_path / "mnt")
    assert one_line_error(proc) == (f"{tmp_path}/mnt/out: read-only file system while writing "
                                    "the output (nothing was left behind)")
    assert left == []
