"""Tensors as payloads: a manifest plus one flat byte string cut into chunks.

A model (or a delta) is a set of named float tensors. As a payload it is one flat
byte string, the tensors back to back in sorted-name order, each written in the chosen
encoding, described by a ``Manifest`` (name, shape, dtype, offset, size per tensor).
The transport cuts it into ~1 MiB chunks, so no message approaches gRPC's 2 GiB cap
whatever the model size.

- ``layout``: where each tensor lives in the flat vector (``ModelLayout``), manifests.
- ``encodings``: fp32 / fp16 / bf16 / int8 on the wire (``Encoding``, ``encode``); ring32 /
  ring64 for a secure-aggregation masked input (``ring_manifest`` in ``layout``).
- ``digest``: "algorithm:hex" payload digests, whole or piece by piece.
- ``chunks``: the chunk size and the pieces a payload is sent in.
- ``buffers``: receive buffers kept for reuse (``BufferPool``).
- ``decoder``: receive one payload chunk by chunk and decode it (``PayloadDecoder``).

Sorted-name order is also safetensors' order for tensors of one dtype, so a
checkpoint's data section *is* the fp32 payload and downloads can be served from the
file without re-encoding. Nothing here knows protobuf: ``fedmae.transport.messages``
converts manifests to and from the wire.

This ``__init__`` imports nothing, so ``fedmae.payload.chunks`` stays free of torch
(admin commands and health checks import it through the channel options).
"""
