"""Published model versions as safetensors files, written crash-consistently.

``v000042.safetensors`` holds the trainable tensors of version 42 by name (loadable
by any safetensors reader) and metadata (version, round, model, payload digest).
Tensors of one dtype lie in the file in sorted-name order, which is the fp32 wire
payload's order: ``FetchModel`` streams that byte range straight from the file.

A rule with state (a server optimizer's moments, ``Strategy.state``) has it saved
beside the version as ``v000042.opt.safetensors`` (float32 tensors, the rule's name and
step count in the metadata), renamed into place before the model file: a version on
disk always has the state it was made with, and the model file stays the plain payload
that downloads stream. Under ``--dp central`` the privacy ledger with that version's
round recorded is saved the same way as ``v000042.privacy.json``
(``aggregator_service.private_rounds``): a restart resumes the rounds spent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from aggregator_service.strategies.base import StrategyState
from fedmae.errors import ConfigError, VersionNotFound
from fedmae.faults import crash_point
from fedmae.payload.digest import payload_digest
from fedmae.payload.layout import ModelLayout

log = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{6,})\.safetensors$")


@dataclass(frozen=True)
class Checkpoint:
    version: int
    round: int
    model: str
    path: Path
    payload_digest: str  # "algorithm:hex" of the fp32 payload
    data_offset: int  # byte offset of the tensor data (= fp32 payload) in the file
    total_bytes: int


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 0):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.safetensors"

    def state_path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.opt.safetensors"

    def ledger_path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.privacy.json"

    def versions(self) -> list[int]:
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(
        self,
        version: int,
        round_: int,
        model: str,
        layout: ModelLayout,
        flat: torch.Tensor,
        state: StrategyState | None = None,
        ledger: str | None = None,
    ) -> Checkpoint:
        """Write version atomically: temp file, fsync, rename, fsync the directory.
        ``state`` (the rule's, if it keeps one) and ``ledger`` (the privacy ledger's
        JSON, under DP) are written, the same way, just before."""
        digest = payload_digest(flat.detach().contiguous().numpy())
        meta = {
            "format": "fedmae-checkpoint/1",
            "version": str(version),
            "round": str(round_),
            "model": model,
            "payload_digest": digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        arrays = {name: t.numpy() for name, t in layout.unflatten(flat.detach()).items()}
        final = self.path(version)
        tmp = final.with_name(final.name + ".tmp")
        save_file(arrays, str(tmp), metadata=meta)
        _fsync(tmp)
        if state is not None:
            self._save_state(version, state)
        if ledger is not None:
            self._save_ledger(version, ledger)
        if round_ > 0:
            crash_point("checkpoint")  # a round's model written, not yet published
        os.replace(tmp, final)
        _fsync(self.dir)  # both renames
        self._prune(version)
        if round_ > 0:
            crash_point("published")  # published, not yet logged
        return self.describe(version, layout)

    def _prune(self, newest: int) -> None:
        if self.keep <= 0:
            return
        for v in self.versions():
            if v <= newest - self.keep:
                self.path(v).unlink(missing_ok=True)
                self.state_path(v).unlink(missing_ok=True)
                self.ledger_path(v).unlink(missing_ok=True)

    def _save_state(self, version: int, state: StrategyState) -> None:
        """The rule's state of ``version``, renamed into place (the caller fsyncs the
        directory). A stale file of a version that was never published is replaced."""
        meta = {
            "format": "fedmae-strategy-state/1",
            "version": str(version),
            "strategy": state.strategy,
            "step": str(state.step),
        }
        arrays = {
            n: t.detach().to(torch.float32).contiguous().numpy() for n, t in state.tensors.items()
        }
        final = self.state_path(version)
        tmp = final.with_name(final.name + ".tmp")
        save_file(arrays, str(tmp), metadata=meta)
        _fsync(tmp)
        os.replace(tmp, final)

    def _save_ledger(self, version: int, ledger: str) -> None:
        """The privacy ledger of ``version``, renamed into place (as ``_save_state``)."""
        final = self.ledger_path(version)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_text(ledger)
        _fsync(tmp)
        os.replace(tmp, final)

    def load_ledger(self, version: int) -> str | None:
        """The privacy ledger's JSON saved with ``version``; ``None`` if none was."""
        path = self.ledger_path(version)
        return path.read_text() if path.exists() else None

    def load_state(self, version: int) -> StrategyState | None:
        """The rule's state saved with ``version``; ``None`` if none was (a
        stateless rule's version, or one written before states were saved)."""
        path = self.state_path(version)
        if not path.exists():
            return None
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "fedmae-strategy-state/1":
            raise ConfigError(f"{path} is not a fedmae strategy state ({meta.get('format')!r})")
        tensors = {n: torch.from_numpy(a) for n, a in load_file(str(path)).items()}
        return StrategyState(meta.get("strategy", ""), int(meta.get("step", 0)), tensors)

    def describe(self, version: int, layout: ModelLayout | None = None) -> Checkpoint:
        """Read a checkpoint's header; check its data section is the fp32 payload."""
        path = self.path(version)
        if not path.exists():
            raise VersionNotFound(
                f"model version {version} is not available (kept: {self.versions()[-5:]})"
            )
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        meta = header.pop("__metadata__", {})
        names = sorted(header)
        expected = 0
        for name in names:
            info = header[name]
            start, end = info["data_offsets"]
            if info["dtype"] != "F32" or start != expected:
                raise ConfigError(f"{path} is not a fedmae fp32 checkpoint ({name}: {info})")
            expected = end
        if layout is not None:
            want = [(e.name, list(e.shape)) for e in layout.entries]
            have = [(n, header[n]["shape"]) for n in names]
            if want != have:
                raise ConfigError(f"{path} does not match the model's tensors and shapes")
        return Checkpoint(
            version=int(meta.get("version", version)),
            round=int(meta.get("round", 0)),
            model=meta.get("model", ""),
            path=path,
            payload_digest=_digest(meta),
            data_offset=8 + header_len,
            total_bytes=expected,
        )

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def map(self, version: int, layout: ModelLayout) -> tuple[Checkpoint, torch.Tensor]:
        """The checkpoint's fp32 payload as a flat tensor mapped from the file (no read,
        no copy: the page cache serves it). Copy-on-write: writing to it changes only
        this process's pages, never the file."""
        ckpt = self.describe(version, layout)
        values = np.memmap(
            ckpt.path, dtype=np.float32, mode="c", offset=ckpt.data_offset, shape=(layout.numel,)
        )
        return ckpt, torch.from_numpy(values)

    def load(self, version: int, layout: ModelLayout) -> tuple[Checkpoint, torch.Tensor]:
        """The checkpoint's metadata and its tensors as one flat float32 vector."""
        ckpt = self.describe(version, layout)
        flat = torch.empty(layout.numel, dtype=torch.float32)
        with safe_open(str(ckpt.path), framework="numpy") as f:
            for e in layout.entries:
                flat[e.offset : e.offset + e.numel] = torch.from_numpy(
                    np.ascontiguousarray(f.get_tensor(e.name)).reshape(-1)
                )
        return ckpt, flat


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(meta: dict[str, str]) -> str:
    if "payload_digest" in meta:
        return meta["payload_digest"]
    legacy = meta.get("payload_sha256", "")  # checkpoints written before digests had names
    return f"sha256:{legacy}" if legacy else ""
