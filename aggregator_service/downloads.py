"""Models going out: download slots, the per-client cap, the idle watchdog, and the
checkpoint streamed from a read-only mapping as ready-made chunk frames."""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from aggregator_service.clock import Clock
from aggregator_service.config import ServerConfig
from aggregator_service.idle_transfers import IdleWatchdog, Watch
from fedmae.errors import FedmaeError, InvalidUpdate, LimitExceeded
from fedmae.payload.chunks import iter_slices
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode, encoding_from_name
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import ModelHeader
from fedmae.transport import frames

log = logging.getLogger(__name__)

FP32 = encoding_from_name("fp32")
_RELEASE_EVERY = 8 << 20  # drop sent checkpoint pages from RSS this often
# Smallest download chunk: FetchModel(chunk_size=1) would send one message per byte
# (a 5 MB model: ~30 min of server CPU). Smaller requests are raised to this.
MIN_DOWNLOAD_CHUNK = 64 << 10


class Download:
    """A held download slot: ``touch`` on progress; an idle one is ended by the watchdog."""

    def __init__(self, client_id: str, watch: Watch):
        self.client_id = client_id
        self.watch = watch
        self.released = False

    def touch(self) -> None:
        self.watch.touch()


class Downloads:
    """Download slots and the streams of published versions.

    ``published()`` gives the latest version and its checkpoint (read under the
    engine's lock, so nobody streams a version before its round is logged);
    ``sent(n)`` counts payload bytes served while a round is open.
    """

    def __init__(
        self,
        config: ServerConfig,
        layout: ModelLayout,
        store: CheckpointStore,
        clock: Clock,
        published: Callable[[], tuple[int, Checkpoint]],
        sent: Callable[[int], None],
    ):
        self.config = config
        self.layout = layout
        self.store = store
        self._clock = clock
        self._published = published
        self._sent = sent
        self._cond = threading.Condition()
        # Downloads at once: each may queue up to a model's worth of frames in gRPC.
        # (In bytes: whole MiB rounded a 4.97 MiB model down to 4, 32 slots for 128 MiB.)
        budget = config.download_budget_mb << 20
        self.max_downloads = max(2, min(64, budget // (layout.numel * 4)))
        self._running = 0
        self.per_client: dict[str, int] = {}
        self.idle = IdleWatchdog(config.download_idle_s, "download")
        self._encoded_cache: tuple[tuple[int, int], memoryview, str] | None = None

    def acquire(
        self,
        client_id: str,
        alive: Callable[[], bool] = lambda: True,
        on_idle: Callable[[], None] = lambda: None,
    ) -> Download:
        """One of the ``max_downloads`` slots (``release`` frees it).

        A client holds at most ``max_downloads_per_client`` at once (more: refused at
        once). A free slot is waited for at most ``transfer_wait_s``; RESOURCE_EXHAUSTED
        after that. ``on_idle`` ends the download (``context.cancel``) when the client
        reads nothing for ``download_idle_s``: its ``finally`` then frees the slot.
        """
        cap, wait_s = self.config.max_downloads_per_client, self.config.transfer_wait_s
        deadline = self._clock.monotonic() + wait_s
        with self._cond:
            held = self.per_client.get(client_id, 0)
            if cap and held >= cap:
                raise LimitExceeded(
                    f"client {client_id} already has {held} downloads in flight (the limit "
                    f"per client is {cap}): finish or cancel one first"
                )
            self.per_client[client_id] = held + 1
            try:
                while self._running >= self.max_downloads:
                    if self._clock.monotonic() >= deadline or not alive():
                        raise LimitExceeded(
                            f"{self.max_downloads} downloads are in flight (the limit for this "
                            f"model size); no slot freed within {wait_s:g}s: retry later"
                        )
                    self._clock.wait(self._cond, min(1.0, deadline - self._clock.monotonic()))
            except BaseException:
                self._forget(client_id)
                raise
            self._running += 1

        def idle() -> None:
            log.warning("download by %s read nothing for %gs: cancelled, its slot is free",
                        client_id, self.config.download_idle_s)  # fmt: skip
            on_idle()

        return Download(client_id, self.idle.watch(idle))

    def release(self, download: Download) -> None:
        """Free a download's slot (idempotent)."""
        with self._cond:
            if download.released:
                return
            download.released = True
        download.watch.close()
        with self._cond:
            self._running -= 1
            self._forget(download.client_id)
            self._cond.notify_all()

    def _forget(self, client_id: str) -> None:
        left = self.per_client.get(client_id, 1) - 1
        if left > 0:
            self.per_client[client_id] = left
        else:
            self.per_client.pop(client_id, None)

    def stream(
        self, version: int | None, encoding: int, chunk_size: int, offset: int = 0
    ) -> tuple[ModelHeader, Iterator[bytes]]:
        """Header and serialized chunk messages (``fedmae.transport.frames``) of a
        published version (``None`` = the latest); fp32 is read from the checkpoint file.

        ``chunk_size`` (0 = the server's) is clamped to ``MIN_DOWNLOAD_CHUNK`` (or the
        server's chunk size if that is smaller) .. 4 × the server's chunk size.
        """
        latest, checkpoint = self._published()
        version = latest if version is None else version
        ckpt = checkpoint if version == latest else self.store.describe(version, self.layout)
        encoding = encoding or FP32
        default = self.config.chunk_size
        chunk_size = max(min(MIN_DOWNLOAD_CHUNK, default), min(chunk_size or default, 4 * default))
        if encoding == FP32:
            manifest = self.layout.manifest(encoding, digest=ckpt.payload_digest)
        else:
            payload, digest = self._encoded(version, encoding)
            manifest = self.layout.manifest(encoding, digest=digest)
        total = self.layout.payload_bytes(encoding)[1]
        if offset > total:
            raise InvalidUpdate(f"offset {offset} is past the model's {total} bytes")
        if encoding == FP32:
            chunks = self._file_chunks(ckpt, chunk_size, offset)
        else:
            chunks = iter_slices(payload, chunk_size, offset)
        header = ModelHeader(ckpt.version, ckpt.round, ckpt.model, manifest)
        return header, self._frames(chunks)

    def _encoded(self, version: int, encoding: int) -> tuple[memoryview, str]:
        """A version in another encoding, made once and shared by every client that asks
        (not re-encoded per download); only the latest such payload is kept."""
        with self._cond:
            cached = self._encoded_cache
            if cached is not None and cached[0] == (version, encoding):
                return cached[1], cached[2]
        _, flat = self.store.map(version, self.layout)  # read once, from the page cache
        payload = encode(flat, encoding)
        digest = payload_digest(payload)
        with self._cond:
            self._encoded_cache = ((version, encoding), payload, digest)
        return payload, digest

    def _file_chunks(
        self, ckpt: Checkpoint, chunk_size: int, offset: int
    ) -> Iterator[tuple[int, memoryview]]:
        """Pieces of the checkpoint's data section as views of a read-only mapping:
        framing copies them once, straight from the page cache. Sent pages are dropped
        from this process's resident set as the stream goes (the page cache keeps
        them), so a download holds at most ``_RELEASE_EVERY`` bytes of the file."""
        base, end = ckpt.data_offset, ckpt.data_offset + ckpt.total_bytes
        with open(ckpt.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < end:
                raise FedmaeError(f"checkpoint {ckpt.path} is truncated")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        released = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            while offset < ckpt.total_bytes:
                n = min(chunk_size, ckpt.total_bytes - offset)
                with view[base + offset : base + offset + n] as piece:
                    yield offset, piece
                offset += n
                sent = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
                if sent - released >= _RELEASE_EVERY or offset == ckpt.total_bytes:
                    mm.madvise(mmap.MADV_DONTNEED, released, sent - released)
                    released = sent
        finally:
            view.release()
            mm.close()

    def _frames(self, chunks: Iterator[tuple[int, bytes | memoryview]]) -> Iterator[bytes]:
        for offset, data in chunks:
            self._sent(len(data))
            yield frames.frame(offset, data)


class FinalFetches:
    """After a completed run: which clients (subscribed at the end, or since) still
    have to fetch the final version. The server keeps serving it until they did."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._cond = threading.Condition()
        self._fetched: dict[str, int] = {}  # the newest version each client got in full
        self._final: int | None = None
        self._waiting: set[str] = set()

    def expect(self, clients: list[str], final_version: int) -> None:
        """The run is over at ``final_version``: these clients should fetch it."""
        with self._cond:
            self._final = final_version
            self._waiting |= {c for c in clients if self._fetched.get(c) != final_version}
            self._cond.notify_all()

    def fetched(self, client_id: str, version: int) -> None:
        with self._cond:
            self._fetched[client_id] = max(version, self._fetched.get(client_id, version))
            if version == self._final and client_id in self._waiting:
                self._waiting.discard(client_id)
                log.info("client %s fetched the final version %d (%d still to fetch it)",
                         client_id, version, len(self._waiting))  # fmt: skip
                self._cond.notify_all()

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s for every expected fetch; the clients still owing."""
        deadline = self._clock.monotonic() + timeout
        with self._cond:
            while self._waiting and (left := deadline - self._clock.monotonic()) > 0:
                self._clock.wait(self._cond, left)
            return sorted(self._waiting)
