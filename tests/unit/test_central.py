"""``train-central``: the pooled data is the union of the sites' training shards, and a
pass of the federated clients' own training lowers the server's held-out loss."""

from __future__ import annotations

import json

import numpy as np

from aggregator_service.checkpoint_store import CheckpointStore
from fedmae.cli.main import main
from fedmae.config import TrainingConfig
from fedmae.ml.central import pooled_training_set, train_central
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.model_zoo import build_model
from fedmae.ml.partitions import client_split
from fedmae.ml.training import evaluate


def test_the_pool_is_the_union_of_the_sites_training_shards(fmnist_train):
    pooled = pooled_training_set(fmnist_train, 3, seed=5, limit=900)
    shards = [client_split(fmnist_train, k, 3, seed=5, limit=900) for k in range(3)]
    assert len(pooled) == sum(len(s.train) for s in shards) == 810  # 10 % held out per site
    assert np.array_equal(pooled.images, np.concatenate([s.train.images for s in shards]))
    assert (pooled.mean, pooled.std) == (fmnist_train.mean, fmnist_train.std)
    skewed = pooled_training_set(fmnist_train, 4, dirichlet_alpha=0.3, seed=5, limit=900)
    assert len(skewed) == sum(
        len(client_split(fmnist_train, k, 4, dirichlet_alpha=0.3, seed=5, limit=900).train)
        for k in range(4)
    )


def test_one_pass_lowers_the_held_out_loss(fmnist_train):
    images = pooled_training_set(fmnist_train, 3, limit=300).to_tensor()
    held_out = load_fashion_mnist(split="test").to_tensor(list(range(100)))
    model = build_model("tiny", seed=0)
    initial = evaluate(build_model("tiny", seed=0), held_out, 0.75)
    seen = []
    records = train_central(
        model, images, held_out, TrainingConfig(), 1, on_pass=lambda r, m: seen.append(r)
    )
    assert [r.pass_ for r in records] == [0, 1] and seen == records
    assert records[0].eval_loss == initial  # pass 0 is the untrained model, same masks
    assert records[1].eval_loss < 0.8 * records[0].eval_loss
    assert records[1].eval_loss == evaluate(model, held_out, 0.75)  # fixed, seeded masks
    assert records[1].images == len(images) == 270


def test_the_command_writes_checkpoints_and_a_log(tmp_path):
    out = tmp_path / "central"
    argv = ["train-central", "--out", str(out), "--images", "200", "--passes", "1"]
    assert main([*argv, "--eval-images", "100", "--threads", "1"]) == 0
    log = json.loads((out / "central.json").read_text())
    assert [p["pass"] for p in log["passes"]] == [0, 1]
    assert set(log["passes"][1]) == {"pass", "train_loss", "eval_loss", "seconds", "images"}
    assert log["passes"][1]["eval_loss"] < log["passes"][0]["eval_loss"]
    store = CheckpointStore(out / "checkpoints")
    assert store.versions() == [0, 1]
    assert store.describe(1).model == "tiny"
    # probe and export read these like the aggregator's own checkpoints
    assert main(["export", "--state-dir", str(out), "--out", str(tmp_path / "m.safetensors")]) == 0
