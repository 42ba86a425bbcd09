"""Generate fedmae/transport/_proto from proto/ with grpcio-tools (``make proto``).

protoc writes modules named after the proto path (``fedmae/v1/...``); we move them
into the ``fedmae.transport._proto`` package and rewrite their imports, so no top-level
``proto`` package exists (it would collide with the proto-plus library).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
OUT_DIR = REPO / "fedmae" / "transport" / "_proto"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc on every proto/fedmae/v1/*.proto; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.glob("fedmae/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "fedmae" / "v1").iterdir()):
            text = re.sub(
                r"\bfrom fedmae\.v1 import\b",
                "from fedmae.transport._proto import",
                src.read_text(),
            )
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text('"""Generated from proto/ by scripts.protogen; do not edit."""\n')
        written.append(init)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    shutil.rmtree(OUT_DIR / "__pycache__", ignore_errors=True)
