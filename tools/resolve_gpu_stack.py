"""Resolve the project's `gpu` extra with pip's resolver (no install) and print what it would
install: the check that the pins of pyproject.toml fit together with the GPU stack.

    python tools/resolve_gpu_stack.py [--python-version 3.12] [--extra gpu] [--report out.json]

Not part of the test suite: it needs the package index, and resolving vLLM's tree takes minutes.
Exit status: pip's (non-zero on a conflict, with pip's explanation on stderr), or 1 when the
resolved torch is not the base pin.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the table leads with: the packages whose versions must agree across the stack.
KEY_PACKAGES = ("torch", "vllm", "megatron-core", "transformer-engine", "transformer-engine-torch",
                "nvidia-modelopt", "transformers", "tokenizers", "numpy", "numba", "triton",
                "flashinfer-python", "mistral-common")


def requirements(extra: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"error: pyproject.toml has no [project.optional-dependencies] {extra}")
    return [*project["dependencies"], *extras[extra]]


def resolve(reqs: list[str], python_version: str | None) -> tuple[int, list[tuple[str, str]], str]:
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), "-r", str(req_file)]
        if python_version:
            # pip resolves for another interpreter only from wheels.
            cmd += ["--python-version", python_version, "--only-binary=:all:",
                    "--target", str(Path(tmp) / "target")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return proc.returncode, [], proc.stderr
        installs = json.loads(report.read_text())["install"]
    versions = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"])
                      for i in installs)
    return 0, versions, proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", default="gpu")
    parser.add_argument("--python-version", help="resolve for this Python (default: this one)")
    parser.add_argument("--report", type=Path, help="also write {package: version} as JSON here")
    args = parser.parse_args(argv)
    reqs = requirements(args.extra)
    code, versions, stderr = resolve(reqs, args.python_version)
    if code:
        print(f"error: pip cannot resolve the `{args.extra}` extra:\n{stderr}", file=sys.stderr)
        return code
    found = dict(versions)
    print(f"| package | version |  ({len(versions)} packages for the `{args.extra}` extra)")
    print("|---|---|")
    for name in KEY_PACKAGES:
        if name in found:
            print(f"| {name} | {found[name]} |")
    others = [(n, v) for n, v in versions if n not in KEY_PACKAGES]
    print("\nothers: " + ", ".join(f"{n}=={v}" for n, v in others))
    if args.report:
        args.report.write_text(json.dumps(found, indent=1) + "\n")
    torch_pin = next(r.split("==")[1] for r in reqs if r.startswith("torch=="))
    if found.get("torch", "").split("+")[0] != torch_pin:
        print(f"error: resolved torch {found.get('torch')} is not the base pin {torch_pin}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
