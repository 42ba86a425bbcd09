"""The aggregator process: state directory, model, round loop and the gRPC server."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator_service import admin_pins
from aggregator_service.checkpoint_store import CheckpointStore
from aggregator_service.config import SAFE_MIN_PARTICIPANTS, ServerConfig
from aggregator_service.engine import RoundEngine
from aggregator_service.global_eval import GlobalEvaluator
from aggregator_service.metrics import Metrics
from aggregator_service.private_rounds import PrivateRounds
from aggregator_service.published_model import resume_state
from aggregator_service.registry import Registry
from aggregator_service.round_feed import RoundFeed
from aggregator_service.round_log import RoundLog
from aggregator_service.rpc import federation as federation_servicer
from aggregator_service.rpc.admin import AdminServicer
from aggregator_service.rpc.auth import Authorizer
from aggregator_service.rpc.enrollment import EnrollmentServicer
from aggregator_service.rpc.federation import FederationServicer
from aggregator_service.rpc.rate_limit import PeerRateLimit
from aggregator_service.rpc.request_guard import RequestGuard
from aggregator_service.strategies import Strategy, make_strategy
from aggregator_service.update_store import SPILL_FILE
from fedmae.errors import ConfigError
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.layout import ModelLayout
from fedmae.pki.ca import MAX_LEAF_DAYS, CertificateAuthority
from fedmae.pki.files import ServerCerts
from fedmae.private_files import private_dir
from fedmae.secagg.signing import CertificateCheck
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import grpc_options
from fedmae.transport.credentials import server_credentials
from fedmae.transport.status import StatusInterceptor

log = logging.getLogger(__name__)

FEDERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
ADMIN_SERVICE = apb.DESCRIPTOR.services_by_name["Admin"].full_name
ENROLLMENT_SERVICE = epb.DESCRIPTOR.services_by_name["Enrollment"].full_name

# The enrollment port takes callers without a certificate: everything it may use is
# small and fixed. An EnrollRequest is a token (56 B), a CSR (359 B PEM for P-256,
# 1.6 kB for RSA-4096) and labels: 466 B as `fedmae enroll` sends it with two labels;
# the response, two certificates, 1.3 kB. 64 KiB leaves room for any sane labels.
ENROLL_WORKERS = 8  # handler threads = calls at once; more get RESOURCE_EXHAUSTED
ENROLL_MAX_MESSAGE_BYTES = 64 << 10
ENROLL_STREAMS_PER_CONNECTION = 4
# An enrollment is one short call: a connection goes away after a minute, and calls
# still open 10 s later (a caller that never sends its request) are cut.
ENROLL_CONNECTION_AGE_S = 60.0
ENROLL_CONNECTION_AGE_GRACE_S = 10.0


def _connection_age(age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """GOAWAY after ``age_s`` (0 = never); calls still running are cut ``grace_s``
    later (0 = never)."""
    options = []
    if age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(age_s * 1000)))
        if grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", int(grace_s * 1000)))
    return options


class AggregatorServer:
    """Owns the state directory and serves ``Federation``, ``Admin`` and health on the
    mTLS port, and ``Enrollment`` on a separate server (TLS without client certificates).

    ``start()`` returns the bound port (``listen`` may end in ``:0``); ``wait()`` blocks
    until the run ends or ``stop()`` is called. Without a ``strategy`` the one named by
    ``config.strategy`` is built, evaluating each model on ``config.eval_data`` if set.
    """

    def __init__(
        self,
        config: ServerConfig,
        strategy: Strategy | None = None,
        echo: TextIO | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ):
        self.config = config
        self.interceptors = list(interceptors)  # outermost first, on the mTLS port
        # Central DP's σ (calibrated: a second or so) before anything is made, so an
        # unmeetable target exits 2 leaving no state directory behind.
        state = initial_state(config.training.model, seed=config.model_seed)
        self.layout = ModelLayout.from_state(state)
        private = None
        if config.privacy is not None:
            private = PrivateRounds.plan(
                config.privacy, config.policy.fraction, config.policy.rounds,
                config.dp_shape(self.layout.numel),
            )  # fmt: skip
        private_dir(config.state_dir)
        self.store = CheckpointStore(config.state_dir / "checkpoints", keep=config.keep_checkpoints)
        latest = self.store.latest()
        if latest is None:
            flat = self.layout.flatten(state)
            checkpoint = self.store.save(0, 0, config.training.model, self.layout, flat)
            log.info(
                "initialised model %r (%d parameters) as version 0",
                config.training.model,
                self.layout.numel,
            )
        else:
            checkpoint, flat = self.store.map(latest, self.layout)
            if checkpoint.model and checkpoint.model != config.training.model:
                raise ConfigError(
                    f"state directory {config.state_dir} holds model {checkpoint.model!r}, "
                    f"not {config.training.model!r}: use another --state-dir or --model"
                )
            log.info("resuming from version %d (round %d)", checkpoint.version, checkpoint.round)
        del state
        if strategy is None:
            evaluator = None
            if config.eval_data:
                evaluator = GlobalEvaluator(
                    config.training.model, config.eval_data, config.eval_images,
                    config.training.mask_ratio,
                )  # fmt: skip
            strategy = make_strategy(
                config.strategy, evaluator=evaluator, options=config.strategy_options
            )
        resume_state(self.store, strategy, checkpoint.version)
        if private is not None:
            private.resume(self.store.load_ledger(checkpoint.version), checkpoint.version)
            log.info("%s", private.describe())
        self.rounds = RoundEngine(
            config,
            self.layout,
            flat,
            checkpoint,
            self.store,
            strategy,
            RoundLog(config.state_dir / "rounds.jsonl", echo=echo),
            # Sites' keys are checked against the federation's root CA, as peers do.
            keys_check=CertificateCheck(ServerCerts(config.certs).root_pem())
            if config.secure is not None
            else None,
            private=private,
        )
        self.registry = Registry(config.state_dir / "fedmae.db")
        self.feed = RoundFeed(self.registry)
        self.metrics = Metrics(self.rounds)
        self.rounds.observers += [self.feed, self.metrics]
        self.metrics_port: int | None = None
        self._recover(checkpoint)
        self.auth = Authorizer(
            self.registry, insecure=config.insecure, max_requests_per_s=config.max_requests_per_s
        )
        self.ca: CertificateAuthority | None = None
        if not config.insecure:
            certs = ServerCerts(config.certs)
            if not 0 < config.client_cert_days <= MAX_LEAF_DAYS:
                raise ConfigError(f"--client-cert-days must be 1 to {MAX_LEAF_DAYS}")
            # Signs enrollments: --ca-key, else the enrollment CA, else the root in CERTS.
            if config.ca_key or certs.enrollment_ca_key.exists() or certs.ca_key.exists():
                self.ca = CertificateAuthority(certs, key_path=config.ca_key)
            else:
                log.warning("no CA key in %s: enrollment is off (pass --ca-key)", config.certs)
            if certs.ca_key.exists() and self.ca is not None and self.ca.cert is not self.ca.root:
                log.warning(
                    "the root CA key %s is within reach of this network-facing server, which "
                    "signs with the enrollment CA: keep it elsewhere ('fedmae certs init "
                    "--signer DIR')", certs.ca_key,
                )  # fmt: skip
            self.auth.root_pem = certs.root_pem()  # an admin to pin must be signed by it
            admin_pins.pin_from_certs_dir(self.registry, certs)
        if (n := config.policy.min_participants) < SAFE_MIN_PARTICIPANTS:
            log.warning(
                "--min-participants %d: with fewer than %d participants in a round, a "
                "participant can infer another's update from the published model (for a "
                "test federation whose sites trust each other)", n, SAFE_MIN_PARTICIPANTS,
            )  # fmt: skip
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self._enroll_server: grpc.Server | None = None
        self.enroll_port: int | None = None
        self._loop: threading.Thread | None = None
        self.health = health.HealthServicer()
        self.port: int | None = None

    def _recover(self, checkpoint) -> None:
        """Make the state agree with itself after a crash (kill -9 at any moment).

        A checkpoint is the publication point: it is renamed into place before the round
        is logged. So a crash can leave a temp file, a torn log line, or a published
        version whose round record never reached the log or the database
        (``RoundEngine.recover_log``).
        """
        for tmp in self.store.dir.glob("*.tmp"):
            tmp.unlink()
            log.warning("removed %s, a checkpoint a crash left half-written", tmp.name)
        spill = self.config.state_dir / SPILL_FILE
        if spill.exists():  # its round was lost with the crash and is run again
            spill.unlink()
            log.warning("removed %s, the updates of a round a crash interrupted", spill.name)
        record = self.rounds.recover_log()
        if record is not None and not self.registry.has_published(record.version):
            self.feed.round_closed(record)

    def start(self) -> int:
        cfg = self.config
        # One handler thread per admitted call, never a queue: past max_workers calls a
        # new one gets RESOURCE_EXHAUSTED at once instead of waiting behind long streams.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="rpc"),
            options=[
                *grpc_options(cfg.chunk_size),
                # Each connection's read buffer grows to this with traffic and stays:
                # 4 MiB by default, so 256 clients held ~1 GB (docs/BENCHMARKS.md).
                ("grpc.experimental.tcp_max_read_chunk_size", 256 << 10),
                ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
                *_connection_age(cfg.max_connection_age_s, cfg.max_connection_age_grace_s),
            ],
            interceptors=[*self.interceptors, StatusInterceptor(), RequestGuard()],
            maximum_concurrent_rpcs=cfg.max_workers,
        )
        federation_servicer.add_to_server(
            FederationServicer(self.rounds, self.auth, cfg.heartbeat_s), server
        )
        services = [FEDERATION_SERVICE, health.SERVICE_NAME]
        if not cfg.insecure:  # without certificates nobody can be told from an admin
            apb_grpc.add_AdminServicer_to_server(
                AdminServicer(self.registry, self.rounds, self.auth, self.feed), server
            )
            services.append(ADMIN_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
        if cfg.insecure:
            log.warning(
                "--insecure: serving PLAINTEXT without client authentication on %s; "
                "anyone who can reach this port can join and read the model (Admin is off)",
                cfg.listen,
            )
            port = server.add_insecure_port(cfg.listen)
        else:
            port = server.add_secure_port(cfg.listen, server_credentials(ServerCerts(cfg.certs)))
        if port == 0:
            raise ConfigError(f"cannot listen on {cfg.listen} (address in use?)")
        enrollment = None
        if self.ca is not None and cfg.enroll_address:
            enrollment, self.enroll_port = self._enrollment_server(cfg.enroll_address)
            services.append(ENROLLMENT_SERVICE)  # its health, as seen from the mTLS port
        server.start()
        if enrollment is not None:
            enrollment.start()
        self._server, self._enroll_server, self.port = server, enrollment, port
        for name in ("", *services):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._loop = threading.Thread(
            target=self.rounds.run, args=(self._stop,), name="rounds", daemon=True
        )
        self._loop.start()
        log.info(
            "aggregator listening on %s (port %d, %s), state in %s",
            cfg.listen,
            port,
            "plaintext" if cfg.insecure else "mTLS",
            cfg.state_dir,
        )
        if self.enroll_port:
            log.info("enrollment (TLS, token) on port %d", self.enroll_port)
        if cfg.metrics_listen:
            self.metrics_port = self.metrics.serve(cfg.metrics_listen)
        return port

    def _enrollment_server(self, address: str) -> tuple[grpc.Server, int]:
        """Enrollment on a server of its own: TLS without client certificates, so anyone
        who reaches the port can call it. Only ``Enrollment`` is served (other services
        answer UNIMPLEMENTED without taking a thread); its few threads, calls, streams
        and small messages are all it can ever take from this process."""
        cfg = self.config
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=ENROLL_WORKERS, thread_name_prefix="enroll"),
            options=[
                ("grpc.max_receive_message_length", ENROLL_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", ENROLL_MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", ENROLL_STREAMS_PER_CONNECTION),
                ("grpc.experimental.tcp_max_read_chunk_size", 64 << 10),
                *_connection_age(ENROLL_CONNECTION_AGE_S, ENROLL_CONNECTION_AGE_GRACE_S),
            ],
            interceptors=[
                StatusInterceptor(),
                PeerRateLimit(cfg.enroll_rate, "enrollment"),
                RequestGuard(),
            ],
            maximum_concurrent_rpcs=ENROLL_WORKERS,
        )
        epb_grpc.add_EnrollmentServicer_to_server(
            EnrollmentServicer(self.registry, self.ca, cfg.client_cert_days), server
        )
        certs = ServerCerts(cfg.certs)
        port = server.add_secure_port(address, server_credentials(certs, require_client_auth=False))
        if port == 0:
            raise ConfigError(f"cannot listen on {address} (address in use?)")
        return server, port

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run finished (True) or ``timeout`` passed (False)."""
        return self.rounds.finished.wait(timeout)

    def serve_final_model(self, stop: threading.Event | None = None) -> list[str]:
        """After a completed run: keep serving downloads of the final version (no round
        starts) for up to ``final_grace_s``, or until every client subscribed at the end
        (or since) has fetched it, or ``stop``. Returns the clients that did not."""
        rounds = self.rounds
        waiting = rounds.wait_final_fetches(0) if rounds.completed else []
        grace = self.config.final_grace_s
        if not waiting or grace <= 0:
            return waiting
        log.info("run complete: serving the final version %d for up to %gs, until %s %s "
                 "fetched it", rounds.version, grace, _names(waiting),
                 "has" if len(waiting) == 1 else "have")  # fmt: skip
        deadline = time.monotonic() + grace
        while waiting and not (stop is not None and stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiting = rounds.wait_final_fetches(min(0.5, left))
        if waiting:
            log.warning("no longer serving the final version %d: %s did not fetch it",
                        rounds.version, _names(waiting))  # fmt: skip
        else:
            log.info("every client fetched the final version %d", rounds.version)
        return waiting

    def stop(self, grace: float | None = None) -> None:
        """End the round loop at once (it is woken, not left to its next poll), then
        the servers, letting calls in flight run up to ``grace`` s (default
        ``exit_grace_s``)."""
        self._stop.set()  # the loop's stop event (``run`` adopted it); wake the loop too
        self.rounds.stop()
        if self._loop is not None:
            self._loop.join(timeout=10)
        self.health.enter_graceful_shutdown()
        self.metrics.stop()
        grace = self.config.exit_grace_s if grace is None else grace
        stopped = [srv.stop(grace) for srv in (self._enroll_server, self._server) if srv]
        for event in stopped:
            event.wait()
        if self._server is not None:
            self._server, self._enroll_server = None, None
            self.registry.close()
        log.info("aggregator stopped")


def serve(config: ServerConfig) -> int:
    """Run until the configured rounds are published (or SIGINT/SIGTERM); return 0."""
    import signal

    server = AggregatorServer(config, echo=sys.stdout)
    server.start()
    stop = threading.Event()

    def _on_signal(signum, _frame):
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.is_set() and not server.wait(timeout=0.5):
        pass
    if not stop.is_set():
        server.serve_final_model(stop)  # a slow client still gets the final model
    # Give in-flight calls a moment to end before the server goes away.
    server.stop(grace=config.exit_grace_s)
    return 0


def _names(clients: list[str], show: int = 10) -> str:
    more = len(clients) - show
    return ", ".join(clients[:show]) + (f" and {more} more" if more > 0 else "")
