"""The aggregator's settings: one object, filled from the command line."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from aggregator_service.privacy_config import PrivacyConfig, check_central
from aggregator_service.strategies import (
    DEFAULT_STRATEGY,
    FedAvg,
    Strategy,
    StrategyOptions,
    strategy_class,
)
from fedmae.config import TrainingConfig
from fedmae.errors import ConfigError
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE
from fedmae.secagg.fixed_point import plan_ring

# With fewer participants than this, one of them can infer another's update from the
# published model: it knows its own delta and the model before and after.
SAFE_MIN_PARTICIPANTS = 3


@dataclass(frozen=True)
class RoundPolicy:
    """When a round starts, whom it asks, and when it closes."""

    min_clients: int = 3  # connected clients needed before a round starts (>= min_participants)
    fraction: float = 1.0  # share of connected clients selected each round
    min_updates: int = 0  # accepted updates needed to publish; 0 = min_clients
    rounds: int = 5  # published rounds to run; 0 = run until stopped
    round_timeout_s: float = 600.0  # deadline for updates after the task is sent
    # Training's deadline moves on while every site still owing an update is connected
    # and advanced its step within progress_timeout_s (aggregator_service/deadlines.py),
    # up to this long after the round started: None = 3 x round_timeout_s, 0 = never.
    round_hard_timeout_s: float | None = None
    progress_timeout_s: float = 60.0
    retry_delay_s: float = 1.0  # pause before retrying a failed round
    max_attempts: int = 0  # attempts per round before the run fails; 0 = unlimited
    seed: int = 0  # client selection is deterministic for a seed
    # Close a round early when every selected client still owing an update has been
    # disconnected this long (instead of waiting for the deadline).
    dropout_grace_s: float = 30.0
    # Over-selection: with fraction/min_clients selecting more clients than needed, close
    # as soon as this many updates arrived (0 = wait for every selected client).
    target_updates: int = 0
    # Accepted updates below which a round never publishes, whatever min_updates says:
    # with 2 participants, each recovers the other's update from the published model
    # and its own (issue 13). Lower only for a test federation whose sites trust each
    # other.
    min_participants: int = SAFE_MIN_PARTICIPANTS
    # Clients to wait for before the first round only (0 = min_clients): a simulation
    # samples its first round from every site, not from the first few to connect.
    start_clients: int = 0

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min_clients must be at least 1")
        if self.min_participants < 1:
            raise ValueError("min_participants must be at least 1")
        if self.min_clients < self.min_participants:
            raise ConfigError(
                f"--min-clients {self.min_clients} is below --min-participants "
                f"{self.min_participants}: a round started with {self.min_clients} clients "
                f"could never publish. Start at least {self.min_participants} clients and "
                f"pass --min-clients {self.min_participants}, or, for a test federation "
                f"whose sites trust each other, lower --min-participants to "
                f"{self.min_clients}"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if self.min_updates < 0 or self.rounds < 0 or self.round_timeout_s <= 0:
            raise ValueError("min_updates and rounds must be >= 0, round_timeout_s > 0")
        hard = self.round_hard_timeout_s
        if hard is not None and hard != 0 and hard < self.round_timeout_s:
            raise ConfigError(
                f"--round-hard-timeout {hard:g} is below --round-timeout "
                f"{self.round_timeout_s:g}: use 0 (never extend) or at least the round timeout"
            )
        if self.progress_timeout_s <= 0:
            raise ConfigError(f"--progress-timeout must be > 0, got {self.progress_timeout_s:g}")
        if self.start_clients < 0:
            raise ValueError("start_clients must be >= 0")

    @property
    def hard_timeout_s(self) -> float:
        """How long after its start a round's training may last at most (0 = no
        extension past ``round_timeout_s``)."""
        if self.round_hard_timeout_s is None:
            return 3 * self.round_timeout_s
        return self.round_hard_timeout_s

    @property
    def required_updates(self) -> int:
        """``min_updates``, else ``min_clients`` (``RoundState.to_publish`` adds the
        ``min_participants`` floor)."""
        return self.min_updates or self.min_clients


@dataclass(frozen=True)
class SecureAggregation:
    """``--secure-aggregation``: rounds whose aggregate the server learns, and no single
    update (Bonawitz et al. 2017 with Bell et al. 2020's neighbour graph;
    docs/privacy.md). The ring and its fixed point are planned at start from
    ``max_sites`` x the weight cap x ``clip`` (``fedmae.secagg.fixed_point.plan_ring``)."""

    threshold: int = 0  # Shamir t; 0 = a strict majority of each site's share holders
    neighbours: int = 0  # SecAgg+ degree above 20 sites; 0 = about 3 log2(n)
    clip: float = 1.0  # each delta value is clipped to [-clip, clip] before encoding
    ring_bits: int | None = None  # 32 or 64; None = 32 while it fits, else 64
    max_sites: int = 100  # sites per round at most (selection is capped to it)
    phase_timeout_s: float = 60.0  # each phase after training: answers due within this

    def __post_init__(self) -> None:
        if self.threshold == 1 or self.threshold < 0:
            raise ConfigError(
                f"--secagg-threshold {self.threshold}: a threshold of 1 lets any one share "
                "holder reveal a site's secret; use 2 or more (0 = default)"
            )
        if self.neighbours < 0 or self.neighbours == 1:
            raise ConfigError(f"--secagg-neighbours {self.neighbours}: use 0 (default) or >= 2")
        if not self.clip > 0 or self.max_sites < 2 or self.phase_timeout_s <= 0:
            raise ConfigError(
                "secure aggregation needs --secagg-clip > 0, --secagg-max-sites >= 2 and "
                f"--secagg-phase-timeout > 0 (got {self.clip}, {self.max_sites}, "
                f"{self.phase_timeout_s})"
            )


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    listen: str = "127.0.0.1:50051"  # mTLS: Federation, Admin, Health
    # TLS without client certificates, for Enrollment only: "" = the listen port + 1,
    # "off" = no enrollment port.
    enroll_listen: str = ""
    certs_dir: Path | None = None  # default: <state_dir>/certs
    ca_key: Path | None = None  # CA signing key kept outside certs_dir (mode 0600)
    metrics_listen: str | None = None  # Prometheus /metrics, e.g. 127.0.0.1:9100; None = off
    eval_data: str | None = None  # a held-out set the server evaluates each new model on
    eval_images: int = 500
    client_cert_days: int = 365
    insecure: bool = False
    model_seed: int = 0
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    # The aggregation rule by name (aggregator_service/strategies/: fedavg, ...).
    strategy: str = DEFAULT_STRATEGY
    # The rules' knobs (--server-lr, --beta1, --mu, ...): each rule reads those it needs.
    strategy_options: StrategyOptions = field(default_factory=StrategyOptions)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    keep_checkpoints: int = 0  # 0 = keep every published version
    # gRPC handler threads, made as needed: one per connected client's event stream and
    # one per transfer (an idle connected client costs about 120 KB here).
    max_workers: int = 2048
    heartbeat_s: float = 10.0
    exit_grace_s: float = 5.0  # after the run ends, time for clients to hear it
    # After a completed run, keep serving downloads of the final version this long, or
    # until every client subscribed at the end has fetched it (whichever comes first).
    final_grace_s: float = 300.0
    max_uploads_in_flight: int = 8  # concurrent SubmitUpdate streams; more wait for a slot
    transfer_wait_s: float = 120.0  # an upload/download waits this long for a slot at most
    # Memory for downloads in flight: a download can hold up to a model's worth of frames
    # in gRPC's send queue, so this many MB / model size downloads run at once (2..64).
    download_budget_mb: int = 128
    max_downloads_per_client: int = 2  # one client's FetchModel streams at once
    # A download the client reads nothing of for this long is cancelled, an admitted
    # upload that sends no chunk for this long is refused: either frees its slot.
    download_idle_s: float = 60.0
    upload_idle_s: float = 60.0
    max_requests_per_s: float = 20.0  # per client, token bucket (burst 2x); 0 = no limit
    # How far one update can move the model (aggregator_service/update_bounds.py):
    # its weight is min(num_samples, training.max_samples or max_client_samples), its
    # delta is clipped to the round's L2 bound: "auto", a fixed bound, or 0 = off.
    max_client_samples: int = 10_000
    max_update_norm: float | str = "auto"
    norm_bound_factor: float = 5.0  # auto: B = factor x median norm of the last round
    norm_bound_ratio: float = 0.5  # auto, no history: B = ratio x norm of the model
    reflection: bool = False  # gRPC server reflection on the mTLS port
    # Every connection is sent GOAWAY after this long (gRPC adds +-10% jitter): new calls
    # then open a new connection, whose TLS handshake checks the certificate again.
    # 0 = never.
    max_connection_age_s: float = 3600.0
    # Calls still running on a connection past its age may finish within this; 0 = no
    # limit (an agent's event stream is not cut mid-round; the authorizer re-checks it
    # on every heartbeat).
    max_connection_age_grace_s: float = 0.0
    # HTTP/2 streams (calls) at once on one mTLS connection: an agent uses 3 (Subscribe,
    # FetchModel, SubmitUpdate), an admin tool 2 (WatchRounds, Status). More queue in
    # the caller's gRPC library until one ends.
    max_streams_per_connection: int = 16
    enroll_rate: float = 5.0  # enrollment calls per second per peer address (burst 2x)
    # Secure aggregation (None = off: the server sees each update, clipped and weighted).
    secure: SecureAggregation | None = None
    # Central differential privacy (None = --dp off; aggregator_service/privacy_config.py).
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        for name in ("final_grace_s", "max_downloads_per_client", "download_idle_s",
                     "upload_idle_s"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        rule = strategy_class(self.strategy)  # an unknown name fails here, naming the choices
        if self.secure is not None:
            if rule.needs_all_updates or rule.needs_clear_updates:
                raise ConfigError(
                    f"--strategy {self.strategy} needs every update in the clear, which "
                    "secure aggregation never shows the server: use fedavg with it (each "
                    "site clips its own delta to --secagg-clip before masking)"
                )
            if self.insecure:
                raise ConfigError(
                    "--secure-aggregation needs mTLS identities (sites sign their keys "
                    "with them): it cannot run with --insecure"
                )
            # The ring must hold any sum the configuration allows: checked before the
            # server creates anything (ConfigError naming the numbers).
            plan_ring(self.secure.max_sites, self.weight_cap, self.secure.clip,
                      self.secure.ring_bits)  # fmt: skip
        self._check_round_size(rule)
        if self.privacy is not None:
            check_central(
                self.privacy, self.policy.fraction, self.policy.rounds, self.strategy,
                sums=issubclass(rule, FedAvg) and not rule.needs_all_updates,
                secure=self.secure is not None,
            )  # fmt: skip
        if self.insecure and not is_loopback(self.listen):
            raise ConfigError(
                f"--insecure serves plaintext without authentication: it may only listen on a "
                f"loopback address (127.0.0.1, ::1, localhost), not {self.listen!r}"
            )

    def dp_shape(self, dim: int):
        """What distributed DP's noise is planned for (``privacy_config.Shape``): the
        fewest inputs a round publishes with (each site adds 1/this of the noise, so
        every published sum carries all of it) and secure aggregation's ring."""
        from aggregator_service.privacy_config import Shape

        secure = self.secure or SecureAggregation()
        fewest = max(2, self.policy.min_participants, self.policy.required_updates)
        return Shape(dim, fewest, secure.max_sites, secure.ring_bits)

    def _check_round_size(self, rule: type[Strategy]) -> None:
        """Refuse a round policy under which a round could aggregate fewer updates than
        the rule needs (a median of 2, Krum with n <= 2f + 2), naming the numbers."""
        need, why = rule.fewest_updates(self.strategy_options)
        p = self.policy
        floor = max(1, p.required_updates, p.min_participants)
        if floor < need:
            raise ConfigError(
                f"--strategy {self.strategy} needs at least {need} updates per round "
                f"({why}), but a round here may publish with {floor} (--min-clients "
                f"{p.min_clients}, --min-updates {p.min_updates}, --min-participants "
                f"{p.min_participants}): raise them to {need} or more"
            )

    @property
    def weight_cap(self) -> int:
        """The most samples an update weighs (``update_bounds``): --max-samples if set,
        else --max-client-samples."""
        return int(self.training.max_samples or self.max_client_samples)

    @property
    def certs(self) -> Path:
        return self.certs_dir or self.state_dir / "certs"

    @property
    def enroll_address(self) -> str | None:
        if self.enroll_listen == "off" or self.insecure:
            return None
        if self.enroll_listen:
            return self.enroll_listen
        host, _, port = self.listen.rpartition(":")
        return f"{host}:{int(port) + 1 if int(port) else 0}"


def is_loopback(listen: str) -> bool:
    """Whether a ``HOST:PORT`` listen address binds loopback only (127.0.0.0/8, ::1,
    localhost). An empty host, a wildcard or any other name is not."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
