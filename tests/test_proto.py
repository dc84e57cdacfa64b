"""The committed stubs must be exactly what the generator makes from cit.proto."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True)
    for name in ("cit_pb2.py", "cit_pb2_grpc.py", "cit_pb2.pyi"):
        fresh = (tmp_path / "cit_proto" / name).read_text()
        committed = (ROOT / "proto" / "cit_proto" / name).read_text()
        assert fresh == committed, f"proto/cit_proto/{name} is stale: run scripts/gen_proto.sh"


def test_stubs_import_from_the_namespaced_package():
    from cit_proto import cit_pb2, cit_pb2_grpc

    assert cit_pb2.DESCRIPTOR.package == "cit.v1"
    assert hasattr(cit_pb2_grpc, "CitStub")
