"""A real aggregator on 127.0.0.1 with real mTLS, and scripted clients that talk to it.

Scripted clients use the client agent's own transfer code but send deltas the test
chooses, so the test can compute the expected model independently.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from aggregator_service.config import RoundPolicy, ServerConfig
from aggregator_service.registry import Registry
from aggregator_service.rpc.server import AggregatorServer
from aggregator_service.strategies import Strategy
from client_agent.enrollment import enroll
from fedmae.config import TrainingConfig
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.pki.issue import init_certs, issue_client
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import open_channel
from fedmae.transport.credentials import channel_credentials
from fedmae.transport.transfer import federation_stub, fetch_model, update_messages

TIMEOUT = 30.0
# Channel options of a client that holds downloads unread: without BDP probing its
# receive window stays small, so an unread FetchModel stalls after about one 1 MiB frame.
# (With probing gRPC buffered 4 of the 5.2 MB tiny model, at times all of it.)
UNREAD_DOWNLOADS = [("grpc.http2.bdp_probe", 0)]


def wait_until(predicate, what: str, timeout: float = TIMEOUT, every: float = 0.05):
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else an
    AssertionError naming ``what``. Polls observable state; the interval is not a
    synchronisation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def make_server(
    state_dir: Path,
    certs_dir: Path,
    min_clients: int,
    rounds: int,
    port: int = 0,
    server: dict | None = None,
    training: TrainingConfig | None = None,
    strategy: Strategy | None = None,
    interceptors: tuple = (),
    **policy: object,
) -> AggregatorServer:
    """An aggregator on 127.0.0.1 (port 0 = any) with the tiny model, not started;
    ``server`` holds other ServerConfig fields, ``policy`` RoundPolicy fields."""
    config = ServerConfig(
        state_dir=state_dir,
        listen=f"127.0.0.1:{port}",
        certs_dir=certs_dir,
        policy=RoundPolicy(
            **{"min_clients": min_clients, "rounds": rounds, "round_timeout_s": 60.0, **policy}
        ),
        training=training or TrainingConfig(model="tiny"),
        heartbeat_s=1.0,
        exit_grace_s=0.5,
        **(server or {}),
    )
    return AggregatorServer(config, strategy=strategy, interceptors=interceptors)


def held_upload(client, layout, delta, round_, release: threading.Event, started: threading.Event):
    """An upload that sends its header and first chunk, then waits for ``release``."""
    msgs = list(update_messages(
        layout, delta, round_=round_, base_version=0, num_samples=5,
        encoding=pb.ENCODING_FP32, metrics={}, chunk_size=1 << 20,
    ))  # fmt: skip

    def stream():
        yield msgs[0]
        yield msgs[1]
        started.set()
        release.wait(TIMEOUT)
        yield from msgs[2:]

    return client.stub.SubmitUpdate.future(stream(), timeout=TIMEOUT)


def open_admin(port: int, certs: Path) -> tuple[grpc.Channel, apb_grpc.AdminStub]:
    """A channel to the Admin service as CERTS/admin, and its stub."""
    channel = open_channel(f"127.0.0.1:{port}", ClientIdentity(certs / "admin"))
    return channel, apb_grpc.AdminStub(channel)


def tls_only_channel(address: str, ca_pem: bytes) -> grpc.Channel:
    """A TLS channel without a client certificate, as someone who is not enrolled has."""
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem))


def code_of(call) -> grpc.StatusCode:
    """The status code of the RpcError that ``call()`` must raise."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def identity_channel(port: int, identity: Path) -> grpc.Channel:
    """An mTLS channel to 127.0.0.1:``port`` as the identity in directory ``identity``."""
    creds = channel_credentials(ClientIdentity(identity))
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def admin_call_error(port: int, identity: Path) -> grpc.RpcError | None:
    """One Admin call with ``identity``: None if it was answered, else its error."""
    with identity_channel(port, identity) as ch:
        try:
            apb_grpc.AdminStub(ch).Status(apb.StatusRequest(), timeout=TIMEOUT)
        except grpc.RpcError as err:
            return err
    return None


def raised_status(excinfo) -> grpc.StatusCode:
    """The status code of the RpcError a ``pytest.raises`` block caught."""
    return excinfo.value.code()


class ScriptedClient:
    """A client identity, a channel, and a background Subscribe stream."""

    def __init__(self, port: int, identity_dir: Path, subscribe: bool = True, options: list = ()):
        self.identity = ClientIdentity(identity_dir)
        self.channel = open_channel(f"127.0.0.1:{port}", self.identity, options=options)
        self.stub = federation_stub(self.channel)
        self.events: queue.Queue[pb.RoundEvent] = queue.Queue()
        self._call = None
        if subscribe:
            self._call = self.stub.Subscribe(pb.SubscribeRequest(agent_version="test"))
            threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self._call:
                if event.WhichOneof("event") != "heartbeat":
                    self.events.put(event)
        except grpc.RpcError:
            pass

    def wait_for(self, kind: str, timeout: float = TIMEOUT, **fields: object) -> pb.RoundEvent:
        """The next event of ``kind`` whose payload matches ``fields``."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    event = self.events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if event.WhichOneof("event") == kind and all(
                    getattr(getattr(event, kind), k) == v for k, v in fields.items()
                ):
                    return event
            raise TimeoutError(f"no {kind} event with {fields} within {timeout}s")
        finally:
            timer.cancel()

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self.channel.close()


def make_identities(
    tmp_path: Path, names: list[str], state_dir: Path | None = None
) -> tuple[Path, dict[str, Path]]:
    """A CA, and client identities registered in ``state_dir`` (default tmp/state)."""
    certs = init_certs(tmp_path / "certs")
    ids = {n: issue_client(certs.dir, n, tmp_path / "ids" / n).dir for n in names}
    registry = Registry((state_dir or tmp_path / "state") / "fedmae.db")
    for name, ident in ids.items():
        info = certificate_info((ident / "client.pem").read_bytes())
        registry.register("test", name, info.fingerprint, info.serial, info.not_after)
    registry.close()
    return certs.dir, ids


@dataclass
class Federation:
    """One started aggregator, its port, and its scripted clients and their identities."""

    server: AggregatorServer
    port: int
    clients: dict[str, ScriptedClient]
    ids: dict[str, Path]


class Federations:
    """Started aggregators with their scripted clients, all stopped on exit.

    ``start(names, ...)`` makes a CA and a registered identity per name, starts an
    aggregator (``min_clients`` defaults to one per name) and connects a client per
    name; the keyword defaults given here apply to every ``start``.
    """

    def __init__(self, tmp_path: Path, **defaults: object):
        self.tmp_path = tmp_path
        self.defaults = defaults
        self.made: list[tuple[AggregatorServer, dict[str, ScriptedClient]]] = []

    def launch(self, names: list[str], **overrides: object) -> Federation:
        """A started aggregator and a scripted client per name. ``policy`` holds
        RoundPolicy fields; other keywords not named here are ServerConfig fields."""
        cfg = {**self.defaults, **overrides}
        min_clients = cfg.pop("min_clients", None) or len(names)
        rounds = cfg.pop("rounds", 1)
        subscribe = cfg.pop("subscribe", True)
        options = cfg.pop("client_options", ())
        training = cfg.pop("training", None)
        policy = cfg.pop("policy", {})
        certs, ids = make_identities(self.tmp_path, names)
        server = make_server(self.tmp_path / "state", certs, min_clients, rounds,
                             server=cfg, training=training, **policy)  # fmt: skip
        port = server.start()
        clients = {
            n: ScriptedClient(port, ids[n], subscribe=subscribe, options=options) for n in names
        }
        self.made.append((server, clients))
        return Federation(server, port, clients, ids)

    def start(
        self, names: list[str], **overrides: object
    ) -> tuple[AggregatorServer, dict[str, ScriptedClient]]:
        """``launch``, returning the server and its clients."""
        fed = self.launch(names, **overrides)
        return fed.server, fed.clients

    def __enter__(self) -> Federations:
        return self

    def __exit__(self, *exc: object) -> None:
        for server, clients in self.made:
            for client in clients.values():
                client.close()
            server.stop(grace=0)


class EnrollmentFederation:
    """A running aggregator (no pre-registered clients) and the operator's admin stub."""

    def __init__(self, tmp_path, min_clients=1, rounds=1, **policy):
        self.tmp = tmp_path
        self.certs = init_certs(tmp_path / "certs")
        self.server = make_server(tmp_path / "state", self.certs.dir, min_clients, rounds, **policy)
        self.port = self.server.start()
        self.enroll_addr = f"127.0.0.1:{self.server.enroll_port}"
        self.admin_channel, self.admin = open_admin(self.port, self.certs.dir)
        self.ca_pem = self.certs.ca_cert.read_bytes()
        self.clients: list[ScriptedClient] = []

    def token(self, name: str = "", ttl: int = 3600, uses: int = 1) -> str:
        req = apb.CreateTokenRequest(name=name, ttl_seconds=ttl, uses=uses)
        return self.admin.CreateToken(req, timeout=TIMEOUT).token

    def enroll(self, token: str, name: str = "", out: str | None = None):
        return enroll(self.enroll_addr, self.ca_pem, token, self.tmp / "ids" / (out or name or
                      "anon"), name=name)  # fmt: skip

    def connect(self, identity_dir, subscribe=True) -> ScriptedClient:
        client = ScriptedClient(self.port, identity_dir, subscribe=subscribe)
        self.clients.append(client)
        return client

    def close(self):
        for c in self.clients:
            c.close()
        self.admin_channel.close()
        self.server.stop(grace=0)


def fetch_flat(
    client: ScriptedClient,
    layout: ModelLayout,
    version: int | None = None,
    resume_attempts: int = 3,
) -> torch.Tensor:
    """A published version (``None`` = the latest) as a flat tensor; a broken download
    is tried again ``resume_attempts`` times (0 for a call that must be refused: a
    refused handshake is UNAVAILABLE, which is otherwise retried for 3.5 s)."""
    _, flat = fetch_model(
        client.stub, layout, version, timeout=TIMEOUT, resume_attempts=resume_attempts
    )
    return flat.clone()


def fedavg_expected(theta: torch.Tensor, deltas: dict[str, torch.Tensor], n: dict[str, int]):
    """θ + Σ nᵢΔᵢ / Σ nᵢ, computed independently in float64 numpy."""
    total = sum(n.values())
    acc = np.zeros(theta.numel(), dtype=np.float64)
    for cid, d in deltas.items():
        acc += n[cid] * d.numpy().astype(np.float64)
    return theta.numpy().astype(np.float64) + acc / total


def random_delta(layout: ModelLayout, seed: int, scale: float = 0.01) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal(layout.numel) * scale).astype(np.float32))


def drive_rounds(
    clients: dict[str, ScriptedClient], layout: ModelLayout, rounds: list[int]
) -> None:
    """Each client answers the task of each listed round with a small random delta."""
    from fedmae.transport.transfer import submit_update

    for r in rounds:
        for i, (_name, client) in enumerate(sorted(clients.items())):
            task = client.wait_for("task", round=r).task
            submit_update(
                client.stub, layout, random_delta(layout, seed=100 * r + i), round_=r,
                base_version=task.model_version, num_samples=10 + i,
                metrics={"train_loss": 1.0 / r, "val_loss": 2.0 / r}, timeout=TIMEOUT,
            )  # fmt: skip
        next(iter(clients.values())).wait_for("round_closed", round=r)


def held_out_losses(state_dir: Path, versions: list[int], images: int = 200) -> list[float]:
    """Masked-patch MSE of checkpoint ``versions`` on the first ``images`` Fashion-MNIST
    test images with fixed masks: whether a run learned, measured the same way for all."""
    from fedmae.cli.checkpoints import load_checkpoint
    from fedmae.ml.fashion_mnist import load_fashion_mnist
    from fedmae.ml.training import evaluate

    held_out = load_fashion_mnist(split="test").to_tensor(list(range(images)))
    from aggregator_service.checkpoint_store import CheckpointStore

    store = CheckpointStore(Path(state_dir) / "checkpoints")
    return [evaluate(load_checkpoint(store, v).model, held_out, 0.75) for v in versions]
