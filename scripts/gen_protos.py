"""Regenerate the Python code for protos/*.proto into src/modelmesh/proto.

    python scripts/gen_protos.py          # write the generated modules
    python scripts/gen_protos.py --check  # exit 1 when the checked-in code has drifted

The generated modules are rewritten in two ways:
- imports between them become package-relative;
- every file is added to one private descriptor pool (``modelmesh.proto._pool.POOL``) instead of
  protobuf's default pool. Our ``inference.*`` messages have the same full names as tritonclient's
  and MLServer's; in the default pool the second one imported fails with "duplicate symbol", so a
  process that uses tritonclient (our tests, users' tools) could not import modelmesh.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "src" / "modelmesh" / "proto"
PROTOS = ["grpc_predict_v2.proto", "model-mesh.proto", "model-runtime.proto"]


def _rewrite(name: str, text: str) -> str:
    text = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)
    if name.endswith("_pb2.py"):
        text = text.replace(
            "from google.protobuf.internal import builder as _builder\n",
            "from google.protobuf.internal import builder as _builder\nfrom ._pool import POOL as _POOL\n",
        )
        text = text.replace("_descriptor_pool.Default().AddSerializedFile", "_POOL.AddSerializedFile")
    return text


def generate() -> dict[str, str]:
    """Run protoc and return {module file name: rewritten source}."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}",
            *[str(PROTO_DIR / p) for p in PROTOS],
        ]
        subprocess.run(cmd, check=True)
        return {p.name: _rewrite(p.name, p.read_text()) for p in sorted(Path(tmp).iterdir())}


def drifted(generated: dict[str, str]) -> list[str]:
    """Names of generated modules whose checked-in copy differs or is missing."""
    out = []
    for name, text in generated.items():
        path = OUT_DIR / name
        if not path.exists() or path.read_text() != text:
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report drift instead of writing")
    args = parser.parse_args()
    generated = generate()
    if args.check:
        bad = drifted(generated)
        if bad:
            print("generated code is out of date: " + ", ".join(bad) + "; run scripts/gen_protos.py")
            return 1
        print("generated code is up to date")
        return 0
    for name, text in generated.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(generated)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
