"""Regenerate the Python stubs from proto/llem/v1/llem.proto, and llem.binpb: the
contract's descriptor with its comments (protoc --include_source_info), which the
server's reflection sends so that `grpcurl describe` shows the documentation.

    python buildscripts/gen_stubs.py          # write client/src/llem/v1/*
    python buildscripts/gen_stubs.py --check  # exit 1 when the committed stubs are stale

Needs grpcio-tools and mypy-protobuf (the server's [dev] extra installs both).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "llem" / "v1" / "llem.proto"
TARGET = ROOT / "client" / "src" / "llem" / "v1"
GENERATED = ["llem_pb2.py", "llem_pb2.pyi", "llem_pb2_grpc.py", "llem_pb2_grpc.pyi", "llem.binpb"]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    # protoc finds the mypy plugins on PATH: use the ones beside this interpreter, so a
    # venv's python works without the venv being activated.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    (out / "llem" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        "--include_source_info",
        f"--descriptor_set_out={out / 'llem' / 'v1' / 'llem.binpb'}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "llem" / "v1"
        if args.check:
            stale = [n for n in GENERATED if not (TARGET / n).exists() or not filecmp.cmp(fresh / n, TARGET / n, shallow=False)]
            if stale:
                print(f"stale stubs: {', '.join(stale)}; run python buildscripts/gen_stubs.py", file=sys.stderr)
                return 1
            print("stubs are up to date")
            return 0
        TARGET.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(fresh / name, TARGET / name)
        print(f"wrote {', '.join(GENERATED)} to {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
