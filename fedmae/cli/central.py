"""``fedmae train-central``: the centralized twin of a federated run (fedmae.ml.central).

Writes into ``--out``: ``checkpoints/vNNNNNN.safetensors`` after each pass (version =
pass, in the aggregator's format, so ``probe``, ``export`` and ``report`` read them) and
``central.json``: the settings and one (pass, train_loss, eval_loss, seconds) per pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("fedmae")
D = " (default %(default)s)"


def cmd_train_central(args: argparse.Namespace) -> int:
    import torch

    from aggregator_service.checkpoint_store import CheckpointStore
    from fedmae.config import TrainingConfig
    from fedmae.ml.central import pooled_training_set, train_central
    from fedmae.ml.loaders import load_dataset
    from fedmae.ml.model_state import trainable_state
    from fedmae.ml.model_zoo import build_model
    from fedmae.payload.layout import ModelLayout

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = TrainingConfig(
        model=args.model,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        mask_ratio=args.mask_ratio,
    )
    dataset = load_dataset(args.data, split="train")
    pooled = pooled_training_set(
        dataset,
        args.sites,
        dirichlet_alpha=args.dirichlet or None,
        seed=args.data_seed,
        val_fraction=args.val_fraction,
        limit=args.images or None,
    )
    held_out = load_dataset(args.eval_data, split="test")
    n_eval = min(args.eval_images, len(held_out)) if args.eval_images else len(held_out)
    eval_images = held_out.to_tensor(list(range(n_eval)))  # the server's: the first n
    model = build_model(args.model, seed=args.model_seed)
    layout = ModelLayout.from_state(trainable_state(model))
    store = CheckpointStore(out / "checkpoints")
    log.info(
        "central: %s, %d pooled training images (%d sites' shards), %d passes, %d held-out images",
        args.model,
        len(pooled),
        args.sites,
        args.passes,
        n_eval,
    )
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    records: list[dict] = []

    def on_pass(record, model) -> None:
        store.save(record.pass_, record.pass_, args.model, layout,
                   layout.flatten(trainable_state(model)))  # fmt: skip
        records.append(record.to_json())
        log_path = out / "central.json"
        tmp = log_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": settings, "passes": records}, indent=1))
        tmp.replace(log_path)

    first: list[float] = []  # when step 1 ended: the ETA counts training, not pass 0's eval
    last = [0.0]

    def progress(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
        if now - last[0] >= args.progress_every or step == total:
            last[0] = now
            eta = (now - first[0]) / max(step - 1, 1) * (total - step)
            log.info("central: %3d%% (step %d/%d) loss %.4f, ETA %.0f s",
                     100 * step // total, step, total, loss, eta)  # fmt: skip

    result = train_central(model, pooled.to_tensor(), eval_images, cfg, args.passes,
                           seed=args.data_seed, on_pass=on_pass, progress=progress)  # fmt: skip
    print(
        f"train-central: {args.passes} passes over {len(pooled)} images; eval loss "
        f"{result[0].eval_loss:.4f} -> {result[-1].eval_loss:.4f}; "
        f"log {out / 'central.json'}, checkpoints in {store.dir}"
    )
    return 0


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``train-central`` to the ``fedmae`` parser."""
    c = sub.add_parser(
        "train-central",
        help="train the same model on the pooled data of all sites (the centralized twin)",
    )
    c.add_argument("--out", required=True, help="directory for checkpoints/ and central.json")
    c.add_argument("--model", default="tiny", help="registry model name" + D)
    c.add_argument("--passes", type=int, default=1, help="passes over the pooled data" + D)
    c.add_argument("--data", default="fashion-mnist", help="training data (as fedmae client)" + D)
    c.add_argument(
        "--images",
        type=int,
        default=0,
        help="seeded subset of --data before the sites split it, as fedmae client --limit "
        "(the demo: images per client x clients); 0 = all" + D,
    )
    c.add_argument(
        "--sites",
        type=int,
        default=3,
        help="pool the training shards of this many sites (each keeps its validation "
        "split out, as in the federated run)" + D,
    )
    c.add_argument(
        "--dirichlet", type=float, default=0.0, help="the sites' Dirichlet alpha; 0 = IID" + D
    )
    c.add_argument(
        "--val-fraction", type=float, default=0.1, help="each site's validation share" + D
    )
    c.add_argument(
        "--data-seed", type=int, default=0, help="partition and shuffle seed (as --data-seed)" + D
    )
    c.add_argument("--model-seed", type=int, default=0, help="initial model seed" + D)
    c.add_argument(
        "--eval-data", default="fashion-mnist", help="held-out data (its test split)" + D
    )
    c.add_argument(
        "--eval-images",
        type=int,
        default=10000,
        help="held-out images evaluated after each pass, with fixed seeded masks; "
        "0 = the whole test split" + D,
    )
    c.add_argument("--batch-size", type=int, default=64, help="as the clients'" + D)
    c.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate" + D)
    c.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay" + D)
    c.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches masked" + D)
    c.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's" + D)
    c.add_argument(
        "--progress-every", type=float, default=10.0, help="seconds between progress lines" + D
    )
    c.set_defaults(func=cmd_train_central)
