"""The committed stubs must be exactly what the generator makes from the .proto files."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True)
    for name in [f"{stem}{suffix}" for stem in ("cit_pb2", "lm_worker_pb2") for suffix in (".py", "_grpc.py", ".pyi")]:
        fresh = (tmp_path / "cit_proto" / name).read_text()
        committed = (ROOT / "proto" / "cit_proto" / name).read_text()
        assert fresh == committed, f"proto/cit_proto/{name} is stale: run scripts/gen_proto.sh"


def test_stubs_import_from_the_namespaced_package():
    from cit_proto import cit_pb2, cit_pb2_grpc

    assert cit_pb2.DESCRIPTOR.package == "cit.v1"
    assert hasattr(cit_pb2_grpc, "CitStub")
