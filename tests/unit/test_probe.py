"""The linear probe (MAE protocol): an accuracy in [0, 1], the same twice, and better
than chance on real Fashion-MNIST features."""

from __future__ import annotations

import torch

from fedmae.cli.main import main
from fedmae.ml.encoder import extract_features
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.model_zoo import build_model
from fedmae.ml.probe import ProbeConfig, accuracy, fit_linear_classifier, linear_probe


def test_probe_accuracy_is_in_range_and_deterministic(fmnist_train):
    test = load_fashion_mnist(split="test")
    cfg = ProbeConfig(train_images=400, test_images=200, epochs=10)
    first = linear_probe(build_model("tiny", seed=0), fmnist_train, test, cfg)
    assert 0.0 <= first.test_accuracy <= 1.0
    assert (first.train_images, first.test_images, first.features) == (400, 200, "cls")
    # Even a random-init ViT's features separate Fashion-MNIST far above chance (0.1).
    assert first.test_accuracy > 0.3
    images = fmnist_train.subset(range(300))
    features = extract_features(build_model("tiny", seed=0), images.to_tensor())
    labels = torch.from_numpy(images.labels)
    a = fit_linear_classifier(features, labels, 10, cfg)
    b = fit_linear_classifier(features, labels, 10, cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert accuracy(a, features, labels) == accuracy(b, features, labels)


def test_probe_command_on_a_random_init_model(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["probe", "--random-init", "--train-images", "300", "--test-images", "200"]
    assert main([*argv, "--epochs", "5", "--features", "mean", "--json", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert '"features": "mean"' in out.read_text()
    assert main(["probe"]) == 2  # neither a checkpoint nor --random-init
