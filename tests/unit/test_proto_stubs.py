"""The committed gRPC stubs are what `make proto` generates from proto/ today (not stale)."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
STUBS = ROOT / "services" / "proto"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".pyi")
    }


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    protos = sorted(str(p) for p in PROTO_ROOT.rglob("*.proto"))
    assert protos, "no .proto files under proto/"
    # The same command line as `make proto`, into a temporary folder.
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ]
    )
    assert status == 0, "protoc failed on proto/; fix the .proto files"
    fresh = _files(tmp_path)
    committed = {name: data for name, data in _files(STUBS).items() if name != "__init__.py"}
    stale = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not (stale or missing or extra), (
        f"services/proto is stale (changed: {stale}, missing: {missing}, not generated: {extra}); "
        "run `make proto` and commit the result"
    )
