"""The committed modules of proto/ are what the compiler writes from the .proto files today: a .proto
edited without `make proto`, a module edited by hand or a compiler upgrade shows up here."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_modules_are_what_make_proto_writes(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert written
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is not committed: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{relative} differs: run `make proto`"


def test_no_generated_module_is_left_without_its_proto(tmp_path: Path) -> None:
    expected = {p.relative_to(tmp_path) for p in _generator().generate(tmp_path)}
    committed = {
        p.relative_to(ROOT)
        for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")  # the last: none may be left
        for p in (ROOT / "extproc").rglob(pattern)
    }
    assert committed == expected


def test_the_generated_modules_need_no_compiler_at_run_time() -> None:
    """grpcio-tools is a dev dependency: the modules import protobuf and grpcio only (test_deploy.py
    imports every module of the package from the runtime lock alone)."""
    from extproc.approvals.v1 import approvals_pb2, rpc

    assert approvals_pb2.DESCRIPTOR.package == "extproc.approvals.v1"
    assert [m.name for m in rpc.methods()] == ["ListPending", "Get", "Approve", "Deny", "Watch"]
    for path in (ROOT / "extproc" / "approvals" / "v1").glob("*.py"):
        assert "grpc_tools" not in path.read_text(), path


async def test_a_servicer_missing_a_method_of_the_proto_is_refused_at_registration() -> None:
    import grpc
    import pytest

    from extproc.approvals.v1 import rpc

    class Partial:
        async def ListPending(self, request: object, context: object) -> object:
            return request

    server = grpc.aio.server()
    with pytest.raises(TypeError, match=r"does not serve /extproc.approvals.v1.Approvals/Get"):
        rpc.add_to_server(Partial(), server)
    await server.stop(0)
