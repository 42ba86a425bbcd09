"""``fedmae probe``: linear-probe accuracy of a checkpoint's frozen encoder
(fedmae.ml.probe), or of a random-init model as the baseline."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("fedmae")
D = " (default %(default)s)"


def run_probe(args: argparse.Namespace):
    """The probe the flags describe: (ProbeResult, what was probed)."""
    import torch

    from fedmae.ml.loaders import load_dataset
    from fedmae.ml.model_zoo import build_model
    from fedmae.ml.probe import linear_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init:
        if args.checkpoint:
            raise ValueError("give a CHECKPOINT or --random-init, not both")
        model = build_model(args.model or "tiny", seed=args.model_seed)
        subject = f"random-init {args.model or 'tiny'} (seed {args.model_seed})"
    else:
        if not args.checkpoint:
            raise ValueError("give a CHECKPOINT (file, checkpoint folder or state dir)")
        from fedmae.cli.checkpoints import load_checkpoint, locate

        store, version = locate(Path(args.checkpoint), args.version)
        loaded = load_checkpoint(store, version, args.model)
        model = loaded.model
        subject = f"{loaded.checkpoint.path} ({loaded.model_name}, version {version})"
    train = load_dataset(args.data, split="train")
    test = load_dataset(args.data, split="test")
    return linear_probe(model, train, test, probe_config(args)), subject


def probe_config(args: argparse.Namespace, prefix: str = ""):
    """The ProbeConfig of the flags ``add_probe_options`` added (with ``prefix``)."""
    from fedmae.ml.probe import ProbeConfig

    def flag(name: str):
        return getattr(args, prefix.replace("-", "_") + name)

    return ProbeConfig(
        train_images=flag("train_images"),
        test_images=flag("test_images"),
        features=flag("features"),
        epochs=flag("epochs"),
        seed=args.seed if hasattr(args, "seed") else 0,
    )


def cmd_probe(args: argparse.Namespace) -> int:
    result, subject = run_probe(args)
    print(
        f"linear probe of {subject}: test accuracy {result.test_accuracy:.4f} "
        f"(train {result.train_accuracy:.4f}; {result.train_images} train / "
        f"{result.test_images} test images, {result.features} features; "
        f"{result.encode_seconds:.0f} s encoding + {result.fit_seconds:.0f} s fitting)"
    )
    if args.json:
        from dataclasses import asdict

        Path(args.json).write_text(json.dumps({"subject": subject, **asdict(result)}, indent=1))
    return 0


def add_probe_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The probe's knobs (``prefix`` "probe-" where another command borrows them)."""
    p.add_argument(
        f"--{prefix}train-images",
        type=int,
        default=10000,
        help="seeded subset of the training split to fit on; 0 = all 60k (3-5 min for "
        "tiny on this machine)" + D,
    )
    p.add_argument(
        f"--{prefix}test-images",
        type=int,
        default=0,
        help="seeded subset of the test split to score; 0 = all of it" + D,
    )
    p.add_argument(
        f"--{prefix}features",
        choices=["cls", "mean"],
        default="cls",
        help="the class token (the MAE paper) or the mean of the patch tokens" + D,
    )
    p.add_argument(f"--{prefix}epochs", type=int, default=100, help="classifier epochs (AdamW)" + D)
    p.add_argument(
        f"--{prefix}data", default="fashion-mnist", help="labelled data (train/test)" + D
    )


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``probe`` to the ``fedmae`` parser."""
    p = sub.add_parser(
        "probe", help="linear-probe accuracy of a checkpoint's frozen encoder (MAE protocol)"
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="a vNNNNNN.safetensors file, a folder of them or a state dir (its latest)",
    )
    p.add_argument("--version", type=int, help="version in a folder (default: the latest)")
    p.add_argument(
        "--model", help="model to load into (default: the checkpoint's own; tiny for random)"
    )
    p.add_argument(
        "--random-init", action="store_true", help="probe an untrained model (default off)"
    )
    p.add_argument("--model-seed", type=int, default=0, help="--random-init's seed" + D)
    add_probe_options(p)
    p.add_argument("--seed", type=int, default=0, help="subset and classifier seed" + D)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's" + D)
    p.add_argument("--json", help="also write the result here as JSON (default: no file)")
    p.set_defaults(func=cmd_probe)
