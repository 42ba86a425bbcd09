"""``fedmae serve``: the aggregator, its round policy and its limits."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any, TypeVar

from fedmae.cli import ENCODING_NAMES

log = logging.getLogger("fedmae")
T = TypeVar("T")

# Config fields whose flag has another name (the rest are spelt alike: --min-clients
# sets min_clients); a field without a flag keeps its default.
FLAG_OF_FIELD = {
    "round_timeout_s": "round_timeout",
    "round_hard_timeout_s": "round_hard_timeout",
    "progress_timeout_s": "progress_timeout",
    "dropout_grace_s": "dropout_grace",
    "learning_rate": "lr",
    "update_encoding": "encoding",
    "transfer_wait_s": "transfer_wait",
    "download_idle_s": "download_idle_timeout",
    "upload_idle_s": "upload_idle_timeout",
    "final_grace_s": "final_grace",
    "max_connection_age_s": "max_connection_age",
    "max_connection_age_grace_s": "max_connection_age_grace",
    "dp_clip": "-",  # no flag: the engine sends --dp-clip with each task under --dp
}


def _norm_bound(text: str) -> float | str:
    from aggregator_service.update_bounds import parse_norm_bound

    try:
        return parse_norm_bound(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# How long a connection lives, so certificates are checked again.
CONNECTION_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--max-connection-age", float, 3600.0,
     "seconds after which a connection is asked to go away, so the next call's TLS "
     "handshake checks the certificate again; 0 = never"),
    ("--max-connection-age-grace", float, 0.0,
     "seconds that calls running on such a connection may go on before it is cut; "
     "0 = until they end, so no transfer or event stream is cut"),
)  # fmt: skip

# The round's early close, transfers and update bounds: one (flag, type, default, help)
# a row, in the order ``fedmae serve --help`` shows them.
LIMIT_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--dropout-grace", float, 30.0,
     "close a round early once every client still owing an update has been "
     "disconnected this many seconds"),
    ("--target-updates", int, 0,
     "over-selection: close the round once this many updates arrived (0 = all)"),
    ("--max-uploads-in-flight", int, 8,
     "updates received at once (each holds one model-sized buffer); more wait "
     "for a slot, first come first served"),
    ("--transfer-wait", float, 120.0,
     "seconds an upload or download may wait for a slot before RESOURCE_EXHAUSTED"),
    ("--download-budget-mb", int, 128,
     "memory for downloads in flight: budget / model size downloads run at once, "
     "2 to 64; more wait their turn"),
    ("--max-downloads-per-client", int, 2,
     "FetchModel streams one client may run at once; more get RESOURCE_EXHAUSTED "
     "(0 = no cap)"),
    ("--download-idle-timeout", float, 60.0,
     "seconds a download may go without the client reading; then it is cancelled "
     "and its slot freed (0 = never)"),
    ("--upload-idle-timeout", float, 60.0,
     "seconds an admitted upload may go without sending a chunk; then it is refused "
     "(DEADLINE_EXCEEDED) and its slot freed (0 = never)"),
    ("--final-grace", float, 300.0,
     "after the last round, seconds to keep serving the final model until every "
     "client subscribed at the end has fetched it (0 = exit at once)"),
    ("--max-requests-per-s", float, 20.0, "calls per second per client, bursts of 2x; 0 = off"),
    ("--max-update-norm", _norm_bound, "auto",
     "clip each update's delta to this L2 norm before averaging: 'auto' (from the "
     "last round's norms, see --norm-bound-factor/--norm-bound-ratio), a number, or "
     "'off' / 0"),
    ("--norm-bound-factor", float, 5.0,
     "auto bound: this many times the median update norm of the last published round"),
    ("--norm-bound-ratio", float, 0.5,
     "auto bound of a round without history (round 1, or a resumed log without "
     "norms): this fraction of the model's own L2 norm"),
    ("--max-client-samples", int, 10_000,
     "an update weighs at most this many samples, whatever it claims, when "
     "--max-samples is 0 (with --max-samples set, that is the cap)"),
)  # fmt: skip


def _server_lr(text: str) -> float | None:
    return None if text in ("", "default") else float(text)


# The rules' knobs (StrategyOptions): every rule accepts them all and reads those it
# needs, so compose can pass them unconditionally. Defaults: Reddi et al. 2021; the
# robust rules' in docs/privacy.md, "Robust aggregation".
STRATEGY_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--server-lr", _server_lr, None,
     "server learning rate η of fedavgm, fedadam, fedyogi, fedadagrad; default: 1.0 "
     "for fedavgm, 0.01 for the adaptive three"),
    ("--server-momentum", float, 0.9, "server momentum β of fedavgm (m ← β·m + Δ)"),
    ("--beta1", float, 0.9, "first-moment decay β1 of fedadam and fedyogi"),
    ("--beta2", float, 0.99, "second-moment decay β2 of fedadam and fedyogi"),
    ("--tau", float, 1e-3,
     "adaptivity τ of fedadam, fedyogi, fedadagrad: the step is η·m/(√v + τ), v "
     "starts at τ²"),
    ("--mu", float, 0.01,
     "proximal weight μ of fedprox, sent to clients: they add (μ/2)·‖w − w_global‖² "
     "to the local loss"),
    ("--trim-beta", float, 0.1,
     "trimmed-mean: share of updates dropped at each end of every coordinate, in "
     "[0, 0.5); at least one each end when > 0"),
    ("--krum-f", int, 1,
     "multi-krum: Byzantine sites assumed, f; rounds need more than 2f + 2 updates"),
    ("--krum-m", int, 0,
     "multi-krum: updates of lowest Krum score averaged, m (1 = Krum); 0 = n − f"),
    ("--clip-norm", float, 10.0,
     "norm-bounded: L2 norm M each delta is clipped to by the server (10 suits the tiny "
     "MAE's updates of norm 4-9; see update_norm in rounds.jsonl)"),
)  # fmt: skip

STRATEGY_HELP = (
    "aggregation rule by name; choices: fedavg (the sample-weighted mean of the clipped "
    "updates), fedavgm (with server momentum), fedadagrad, fedadam, fedyogi (adaptive "
    "server optimizers, Reddi et al. 2021; their state is saved with each version), "
    "fedprox (fedavg plus a proximal term in local training, Li et al. 2020); robust: "
    "median, trimmed-mean (coordinate-wise, Yin et al. 2018), multi-krum (Blanchard et "
    "al. 2017), norm-bounded (fedavg, the server clipping each delta to an L2 norm, Sun et "
    "al. 2019); docs/privacy.md; "
    "default %(default)s"
)

# Secure aggregation (docs/privacy.md): on with --secure-aggregation.
SECAGG_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--secagg-threshold", int, 0,
     "Shamir threshold t: shares needed to unmask a site; 0 = a strict majority of "
     "each site's share holders (itself and its neighbours)"),
    ("--secagg-neighbours", int, 0,
     "neighbours per site above 20 sites per round (SecAgg+); 0 = about 3 log2(n)"),
    ("--secagg-clip", float, 1.0,
     "each delta value is clipped to [-C, C] before it is encoded in the ring"),
    ("--secagg-max-sites", int, 100,
     "sites per round at most (selection is capped); the ring is planned for it"),
    ("--secagg-phase-timeout", float, 60.0,
     "seconds each phase after training waits for answers; sites silent that long "
     "drop out of the round"),
)  # fmt: skip


def _optional_float(text: str) -> float | None:
    """A number, or nothing (empty: the flag's default; compose passes unset settings so)."""
    return None if text.strip() == "" else float(text)


# Differential privacy (docs/privacy.md, "Central DP" and "Distributed DP").
DP_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--dp-clip", float, 5.0,
     "L2 norm C each site's delta is clipped to, by the site and again by the server; 5 "
     "is the low end of the tiny MAE's honest update norms (4-9): noise grows with C"),
    ("--dp-noise-multiplier", _optional_float, None,
     "σ: the noise on each round's sum has standard deviation σ·C (default: calibrated "
     "from --dp-target-epsilon for the planned --rounds)"),
    ("--dp-target-epsilon", _optional_float, None,
     "ε the run may spend at δ: calibrates σ when --dp-noise-multiplier is not given, and "
     "the run ends ('privacy budget spent') before a round that would exceed it (default: "
     "no target)"),
    ("--dp-delta", _optional_float, None,
     "δ of the (ε, δ) guarantee (default min(1e-5, N^-1.1), well below 1/N for N = "
     "--dp-sites)"),
    ("--dp-clip-quantile", _optional_float, None,
     "adaptive clipping (Andrew et al. 2021; --dp central): C starts at --dp-clip and "
     "follows this quantile γ of the sites' update norms, e.g. 0.5 for the median, from "
     "noised bits paid out of the same ε (default: off, C fixed)"),
    ("--dp-clip-lr", float, 0.2,
     "adaptive clipping: C moves by exp(−η·(unclipped share − γ)) a round, η this"),
    ("--dp-clip-bit-noise", _optional_float, None,
     "adaptive clipping: σ_b, the noise on the count of unclipped sites; must exceed σ/2 "
     "(default q·N/20)"),
    ("--dp-sites", int, 0,
     "N, the population of enrolled sites, fixed for the run: each is in a round with "
     "probability --fraction, and the mean is divided by --fraction x N; required with "
     "--dp (default 0: unset)"),
)  # fmt: skip


def _privacy(args: argparse.Namespace):
    """DP settings from the flags; None with --dp off."""
    from aggregator_service.privacy_config import PrivacyConfig

    if args.dp == "off":
        return None
    return PrivacyConfig(
        clip=args.dp_clip, noise_multiplier=args.dp_noise_multiplier,
        target_epsilon=args.dp_target_epsilon, delta=args.dp_delta, sites=args.dp_sites,
        mode=args.dp, clip_quantile=args.dp_clip_quantile, clip_lr=args.dp_clip_lr,
        clip_bit_noise=args.dp_clip_bit_noise,
    )  # fmt: skip


def _on_off(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"use 1 or 0, not {text!r}")


def _ring_bits(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("32", "64"):
        return int(text)
    raise argparse.ArgumentTypeError(f"ring bits are 32, 64 or auto, not {text!r}")


def _secure(args: argparse.Namespace):
    """The secure-aggregation settings from the flags; None without --secure-aggregation."""
    from aggregator_service.config import SecureAggregation

    if not args.secure_aggregation:
        return None
    return SecureAggregation(
        threshold=args.secagg_threshold, neighbours=args.secagg_neighbours,
        clip=args.secagg_clip, ring_bits=args.secagg_ring_bits,
        max_sites=args.secagg_max_sites, phase_timeout_s=args.secagg_phase_timeout,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from aggregator_service.config import RoundPolicy, ServerConfig
    from aggregator_service.rpc.server import serve
    from aggregator_service.strategies import StrategyOptions
    from fedmae.config import TrainingConfig

    config = _from_flags(
        ServerConfig,
        args,
        state_dir=Path(args.state_dir),
        certs_dir=Path(args.certs) if args.certs else None,
        ca_key=Path(args.ca_key) if args.ca_key else None,
        model_seed=args.seed,
        policy=_from_flags(RoundPolicy, args),
        training=_from_flags(TrainingConfig, args),
        strategy_options=_from_flags(StrategyOptions, args),
        secure=_secure(args),
        privacy=_privacy(args),
    )
    if config.privacy is not None:  # σ calibrated before anything is made (exit 2 if none)
        from aggregator_service.privacy_config import calibrated, model_dim
        from aggregator_service.private_rounds import PrivateRounds

        p = config.policy
        shape = config.dp_shape(model_dim(config.training.model))
        config = dataclasses.replace(config, privacy=calibrated(config.privacy, p.fraction,
                                                                p.rounds, shape))  # fmt: skip
        PrivateRounds.plan(config.privacy, p.fraction, p.rounds, shape)  # and one round fits E
    if not config.insecure and not (config.certs / "server.pem").exists():
        from fedmae.pki.issue import init_certs

        log.info("no certificates in %s yet: creating a CA and server certificate", config.certs)
        init_certs(config.certs)
    return serve(config)


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``fedmae`` parser: every ServerConfig knob as a flag."""
    D = " (default %(default)s)"
    s = sub.add_parser("serve", help="run the aggregator")
    s.add_argument(
        "--state-dir", required=True, help="checkpoints, round log, registry, certs (required)"
    )
    s.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (default %(default)s)")
    s.add_argument("--certs", help="certificates directory (default STATE_DIR/certs)")
    s.add_argument(
        "--enroll-listen",
        default="",
        help="TLS port for enrollment (default: --listen port + 1; 'off' to disable)",
    )
    s.add_argument(
        "--ca-key",
        help="the key to sign enrollments with, kept outside the certs dir (mode 0600): the "
        "enrollment CA's, or the root's for a certs dir without one (default: "
        "CERTS/enrollment-ca.key, else CERTS/ca.key)",
    )
    s.add_argument(
        "--client-cert-days",
        type=int,
        default=365,
        help="validity of enrolled clients' certificates, 1 to 366 days, never past the "
        "enrollment CA's (default %(default)s)",
    )
    s.add_argument(
        "--metrics-listen", help="serve Prometheus /metrics on HOST:PORT (off by default)"
    )
    s.add_argument(
        "--eval-data", help="held-out data the server evaluates each new model on (default: off)"
    )
    s.add_argument("--eval-images", type=int, default=500, help="images of --eval-data used" + D)
    s.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no client authentication, no Admin service; loopback --listen only "
        "(testing; default off)",
    )
    s.add_argument(
        "--enroll-rate",
        type=float,
        default=5.0,
        help="enrollment calls per second from one address (IPv6: one /64), bursts of twice "
        "that; more get RESOURCE_EXHAUSTED; 0 = no limit (default %(default)s)",
    )
    s.add_argument(
        "--reflection",
        action="store_true",
        help="serve gRPC reflection on the mTLS port (for grpcurl; default off)",
    )
    _add_numbers(s, CONNECTION_FLAGS)
    s.add_argument("--model", default="tiny", help="MAE config: tiny, vit_base, ..." + D)
    s.add_argument("--seed", type=int, default=0, help="initial model and client selection" + D)
    s.add_argument("--strategy", default="fedavg", help=STRATEGY_HELP)
    _add_numbers(s, STRATEGY_FLAGS)
    s.add_argument(
        "--min-clients", type=int, default=3, help="connected clients to start a round" + D
    )
    s.add_argument(
        "--min-participants",
        type=int,
        default=3,
        help="accepted updates below which a round never publishes, whatever --min-updates "
        "says: with fewer, a participant can infer another's update from the published "
        "model; lower it only for a test federation whose sites trust each other; at most "
        "--min-clients" + D,
    )
    s.add_argument(
        "--fraction", type=float, default=1.0, help="share of clients asked each round" + D
    )
    s.add_argument(
        "--start-clients",
        type=int,
        default=0,
        help="connected clients to wait for before the first round only, e.g. every "
        "simulated site, so that --fraction samples from all of them; 0 = --min-clients" + D,
    )
    s.add_argument(
        "--min-updates", type=int, default=0, help="updates to publish; 0 = min-clients" + D
    )
    s.add_argument("--rounds", type=int, default=5, help="rounds to run; 0 = until stopped" + D)
    s.add_argument(
        "--round-timeout", type=float, default=600.0, help="round deadline in seconds" + D
    )
    s.add_argument(
        "--round-hard-timeout",
        type=float,
        default=None,
        help="seconds after a round's start past which its training deadline is never "
        "extended; the deadline moves on while every site still owing an update is "
        "connected and reports progress; 0 = never extend (default 3 x --round-timeout)",
    )
    s.add_argument(
        "--progress-timeout",
        type=float,
        default=60.0,
        help="a training site whose step did not advance for this many seconds is not "
        "progressing: the deadline is not extended for it" + D,
    )
    _add_numbers(s, LIMIT_FLAGS)
    s.add_argument(
        "--secure-aggregation",
        nargs="?",
        const=True,
        default=False,
        type=_on_off,
        metavar="1|0",
        help="secure aggregation: the server learns only the weighted sum of each round's "
        "updates, never one site's (docs/privacy.md); '=0' turns it off, for compose's "
        "FEDMAE_SECURE_AGGREGATION (default off)",
    )
    _add_numbers(s, SECAGG_FLAGS)
    s.add_argument(
        "--secagg-ring-bits",
        type=_ring_bits,
        default=None,
        help="ring of the masked inputs: 32, 64, or auto = 32 while the configuration "
        "cannot overflow it (max sites x weight cap x clip), else 64 (default auto)",
    )
    s.add_argument(
        "--dp",
        choices=("off", "central", "distributed"),
        default="off",
        help="client-level differential privacy (DP-FedAvg) with a privacy ledger (ε in "
        "rounds.jsonl, status, /metrics): central = the server clips each delta to --dp-clip "
        "and adds Gaussian noise to the round's sum; distributed = with --secure-aggregation, "
        "each site clips and adds its share of Skellam noise before masking, so the server "
        "never sees a delta nor a noiseless sum (default %(default)s)",
    )
    _add_numbers(s, DP_FLAGS)
    s.add_argument("--local-epochs", type=int, default=1, help="sent to clients" + D)
    s.add_argument("--batch-size", type=int, default=64, help="sent to clients" + D)
    s.add_argument("--lr", type=float, default=1e-3, help="clients' AdamW learning rate" + D)
    s.add_argument("--weight-decay", type=float, default=0.05, help="sent to clients" + D)
    s.add_argument("--mask-ratio", type=float, default=0.75, help="MAE mask ratio" + D)
    s.add_argument("--encoding", default="fp32", choices=ENCODING_NAMES, help="update encoding" + D)
    s.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="samples per client per round; 0 = all. Also caps an update's weight "
        "(default %(default)s)",
    )
    s.add_argument(
        "--keep-checkpoints", type=int, default=0, help="versions kept; 0 = keep all" + D
    )
    s.add_argument(
        "--max-workers",
        type=int,
        default=2048,
        help="gRPC handler threads, made as needed, and calls at once on the mTLS port: one "
        "per connected client plus one per transfer; more calls get RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    s.set_defaults(func=cmd_serve, role="aggregator")


def _add_numbers(
    parser: argparse.ArgumentParser, rows: tuple[tuple[str, Any, Any, str], ...]
) -> None:
    """One flag a row of (flag, type, default, help); the help ends in its default
    (a ``None`` default is explained by the help itself)."""
    for flag, kind, default, text in rows:
        shown = "" if default is None else " (default %(default)s)"  # None: the text says
        parser.add_argument(flag, type=kind, default=default, help=text + shown)


def _from_flags(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A ``cls`` (a config dataclass) with ``given`` fields, the rest from their flags."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        flag = FLAG_OF_FIELD.get(f.name, f.name)
        if f.name not in values and hasattr(args, flag):
            values[f.name] = getattr(args, flag)
    return cls(**values)
