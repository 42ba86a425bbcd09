"""``fedmae export``: a published model's tensors as a plain safetensors file, plus its
config as JSON, for use outside the federation (docs/encoder.md shows how to load it).

The checkpoint is loaded into the named model first (fedmae.cli.checkpoints), so a file
whose tensors do not fit that model's layout, or whose values do not match their
recorded digest, is refused (exit 2) instead of exported.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("fedmae")
D = " (default %(default)s)"
EXPORT_FORMAT = "fedmae-export/1"


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from fedmae.cli.checkpoints import load_checkpoint, locate
    from fedmae.ml.encoder import encoder_state

    store, version = locate(Path(args.state_dir), args.version)
    loaded = load_checkpoint(store, version, args.model)
    tensors = encoder_state(loaded.state) if args.encoder_only else dict(loaded.state)
    part = "encoder" if args.encoder_only else "model"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": EXPORT_FORMAT,
        "part": part,
        "model": loaded.model_name,
        "version": str(loaded.checkpoint.version),
        "round": str(loaded.checkpoint.round),
        "source_digest": loaded.checkpoint.payload_digest,
    }
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out), metadata=metadata)
    config_out = Path(args.config_out) if args.config_out else out.with_suffix(".json")
    description = {**metadata, "config": asdict(loaded.model.config), "tensors": len(tensors)}
    config_out.write_text(json.dumps(description, indent=1) + "\n")
    numel = sum(t.numel() for t in tensors.values())
    print(
        f"exported the {part} of {loaded.model_name} version {version}: {len(tensors)} "
        f"tensors, {numel:,} values -> {out}; config -> {config_out}"
    )
    return 0


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``fedmae`` parser."""
    e = sub.add_parser(
        "export", help="a checkpoint's encoder (or whole model) as safetensors + config JSON"
    )
    e.add_argument(
        "--state-dir",
        required=True,
        help="the aggregator's (or train-central's) state dir, a checkpoint folder or file",
    )
    e.add_argument("--version", type=int, help="model version (default: the latest)")
    e.add_argument(
        "--model",
        help="the model the checkpoint must fit (default: the model its metadata names)",
    )
    e.add_argument(
        "--encoder-only",
        action="store_true",
        help="only the encoder's tensors (default off: the whole trainable state)",
    )
    e.add_argument("--out", required=True, help="the safetensors file to write")
    e.add_argument("--config-out", help="the config JSON (default: --out with the suffix .json)")
    e.set_defaults(func=cmd_export)
