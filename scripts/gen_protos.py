"""Generate the Python code for memsvc's protos: ``python scripts/gen_protos.py``.

Reads every ``proto/**/*.proto`` and writes ``*_pb2.py``, ``*_pb2_grpc.py`` and
their ``.pyi`` stubs (mypy-protobuf) next to the package, so ``proto/memsvc/v1``
becomes ``memsvc/v1``. ``tests/unit/test_generated_code.py`` calls
:func:`generate` into a temporary directory and fails when the committed files
differ, so the generated code can never drift from the contract.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_OUT = ROOT / "memsvc" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """Return the contract's proto files, in a stable order."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc with the gRPC and mypy plugins into ``out_root``.

    Returns the generated files, relative to ``out_root``.
    """
    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return sorted(
        p.relative_to(out_root)
        for p in out_root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        for stale in PACKAGE_OUT.iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
        for rel in files:
            target = ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, target)
            print(f"wrote {rel}")


if __name__ == "__main__":
    main()
