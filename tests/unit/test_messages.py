"""Domain objects <-> protobuf messages (fedmae.transport.messages)."""

from __future__ import annotations

import pytest
import torch

from fedmae.config import TrainingConfig
from fedmae.errors import InvalidUpdate
from fedmae.payload.encodings import RING_ENCODINGS, Encoding
from fedmae.payload.layout import ModelLayout
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import (
    encoding_from_proto,
    encoding_to_proto,
    manifest_from_proto,
    manifest_to_proto,
    training_config_from_proto,
    training_config_to_proto,
)


def test_every_encoding_has_its_wire_number():
    wire = {n for n in pb.Encoding.values() if n != pb.ENCODING_UNSPECIFIED}
    assert {encoding_to_proto(e) for e in Encoding} == wire
    for e in Encoding:
        assert encoding_from_proto(encoding_to_proto(e)) is e
        assert pb.Encoding.Name(encoding_to_proto(e)) == f"ENCODING_{e.name}"
    assert encoding_from_proto(pb.ENCODING_UNSPECIFIED) is Encoding.FP32
    with pytest.raises(InvalidUpdate, match="unsupported encoding 99"):
        encoding_from_proto(99)


# A model's encodings (the ring ones describe a masked input: tests/unit/test_secagg_wire.py).
@pytest.mark.parametrize("encoding", [e for e in Encoding if e not in RING_ENCODINGS])
def test_manifest_roundtrip(encoding):
    layout = ModelLayout.from_state({"b": torch.zeros(3, 2), "a": torch.zeros(5)})
    manifest = layout.manifest(encoding, digest="xxh3-128:" + "0" * 32)
    msg = manifest_to_proto(manifest)
    assert msg.encoding == encoding_to_proto(encoding)
    assert [t.name for t in msg.tensors] == ["a", "b"]
    assert manifest_from_proto(msg) == manifest


def test_training_config_roundtrip_and_proto_defaults():
    cfg = TrainingConfig(model="small", local_epochs=3, batch_size=8, update_encoding="int8")
    assert training_config_from_proto(training_config_to_proto(cfg)) == cfg
    fedprox = TrainingConfig(proximal_mu=0.01)  # FedProx's μ travels with the task
    assert training_config_from_proto(training_config_to_proto(fedprox)) == fedprox
    private = TrainingConfig(dp_clip=5.0)  # central DP's C travels with the task too
    assert training_config_from_proto(training_config_to_proto(private)) == private
    assert training_config_from_proto(pb.TrainingConfig()) == TrainingConfig(weight_decay=0.0)
