"""Compiles every .proto under proto/ into the Python modules committed beside the code that uses them
(``proto/extproc/approvals/v1/approvals.proto`` -> ``extproc/approvals/v1/approvals_pb2.py`` and
``.pyi``). The service's stub and server registration are not generated: ``extproc/approvals/v1/rpc.py``
reads them from the compiled service descriptor, typed.

The generated modules are committed so that the sidecar needs only ``protobuf`` and ``grpcio`` at run
time, not the compiler (``grpcio-tools``, a dev dependency). ``make proto`` runs this into the
repository; ``tests/test_proto.py`` runs it into a temporary folder and compares, so a .proto and its
modules cannot drift apart.

Usage: ``python proto/generate.py [OUT]`` (OUT defaults to the repository root).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def protos() -> list[Path]:
    """Every .proto of the project, as a path relative to proto/ (its import path)."""
    return sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))


def generated_names(proto: Path) -> list[Path]:
    """The modules one .proto compiles to, relative to the output folder."""
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi")]


def generate(out: Path) -> list[Path]:
    """Compiles every .proto into ``out``; returns the files written. Raises RuntimeError when protoc
    fails (it prints why on stderr)."""
    from grpc_tools import protoc  # a dev dependency: imported only when compiling

    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    sources = protos()
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *(str(PROTO_DIR / source) for source in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    return [out / name for source in sources for name in generated_names(source)]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
