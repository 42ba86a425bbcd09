"""The round record: one dataclass for the round log, the SQLite feed, the metrics,
``Admin.Status`` and crash recovery (schema: docs/round-log.md).

``RoundRecord.to_json`` gives the JSON object as the round log has always written it:
the same keys in the same order; ``recovered`` and ``reason`` only when set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from aggregator_service.round_log import RoundLog
from aggregator_service.round_state import RoundState

log = logging.getLogger(__name__)

RECOVERED_REASON = "the aggregator stopped after publishing this version, before logging it"


@dataclass
class ClientRecord:
    """One participant of a round, as its update was folded in."""

    id: str
    samples: int  # the weight used
    samples_claimed: int
    capped: bool
    train_loss: float | None
    val_loss: float | None
    update_norm: float  # before clipping
    clipped: bool
    bytes: int
    upload_s: float


@dataclass
class RoundRecord:
    """A closed round (or attempt). Field names are the round log's keys."""

    round: int
    attempt: int
    status: str  # published, failed or aborted
    version: int
    base_version: int = 0
    selected: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    dropped_reasons: dict[str, str] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {client, reason}
    num_samples: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    eval_loss: float | None = None
    update_norm: dict[str, float] | None = None  # {min, median, max}
    norm_bound: float | None = None
    weight_cap: int | None = None
    duration_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    encoding: str = ""
    strategy: str = ""
    clients: list[ClientRecord | dict[str, Any]] = field(default_factory=list)
    time: str = ""  # UTC, ISO 8601
    recovered: bool = False  # written only when true
    reason: str = ""  # written only when set
    # How far the training deadline moved for sites still progressing (written only then).
    deadline_extended_s: float = 0.0
    # A secure round (written only then): its parameters and counts, nothing per site.
    secure_aggregation: bool = False
    secagg: dict[str, Any] | None = None
    # Central DP (written only then): the mechanism and ε at δ after the rounds
    # published so far (aggregator_service/private_rounds.py ``summary``).
    dp: dict[str, Any] | None = None
    # Keys of an older (or newer) log line that this schema does not know, kept as read.
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def published(self) -> bool:
        return self.status == "published"

    def summary(self) -> str:
        """The closed round in one log line."""
        if not self.published:
            return f"round {self.round} attempt {self.attempt} {self.status}: {self.reason}"
        if self.secure_aggregation:  # no site's loss is known: the server's own evaluation
            loss = f"eval_loss {self.eval_loss or float('nan'):.4f}"
            how = " (secure aggregation)"
        else:
            loss, how = f"val_loss {self.val_loss or float('nan'):.4f}", ""
        return (
            f"round {self.round} published version {self.version}: {len(self.participants)} "
            f"clients{how}, {self.num_samples} samples in all, {loss}, {self.duration_s:.1f}s"
        )

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object, keys in the round log's order."""
        out = {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _OPTIONAL
        }
        if self.recovered:
            out["recovered"] = True
        if self.reason:
            out["reason"] = self.reason
        if self.deadline_extended_s:
            out["deadline_extended_s"] = self.deadline_extended_s
        if self.secure_aggregation:
            out["secure_aggregation"] = True
            out["secagg"] = dict(self.secagg or {})
        if self.dp is not None:
            out["dp"] = dict(self.dp)
        out.update(self.other)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """A record read back from the round log (older lines may lack fields)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        values = {k: v for k, v in data.items() if k in known}
        values["clients"] = [_client(c) for c in data.get("clients") or []]
        other = {k: v for k, v in data.items() if k not in known}
        return cls(**values, other=other)

    @classmethod
    def closed(
        cls,
        state: RoundState,
        *,
        status: str,
        version: int,
        connected: set[str],
        strategy: str,
        encoding: str,
        weight_cap: int,
        phases: dict[str, float],
        now: float,
        wall_time: float,
        eval_loss: float | None = None,
        reason: str = "",
        dp: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """The record of a round the engine just closed."""
        results = sorted(state.accepted.values(), key=lambda r: r.client_id)
        secure = state.secure
        norms = [] if secure else sorted(r.update_norm for r in results)
        dropped = state.dropped(connected)
        if eval_loss is not None and not math.isfinite(eval_loss):
            # The round log is strict JSON (no NaN/Infinity): a diverged model's loss is
            # reported here and recorded as unknown.
            log.error("round %d: the new model's evaluation loss is %s", state.round, eval_loss)
            eval_loss = None
        return cls(
            round=state.round,
            attempt=state.attempt,
            status=status,
            version=version,
            base_version=state.base_version,
            selected=list(state.selected),
            participants=[r.client_id for r in results],
            dropped=sorted(dropped),
            dropped_reasons=dropped,
            rejected=[{"client": c, "reason": r} for c, r in sorted(state.rejected.items())],
            num_samples=secure.total_weight if secure else sum(r.num_samples for r in results),
            train_loss=state.weighted("train_loss"),
            val_loss=state.weighted("val_loss"),
            eval_loss=eval_loss,
            update_norm={
                "min": norms[0],
                "median": float(statistics.median(norms)),
                "max": norms[-1],
            }
            if norms
            else None,  # fmt: skip
            norm_bound=state.norm_bound,
            weight_cap=weight_cap,
            duration_s=round(now - state.started, 3),
            phases=phases,
            bytes_in=state.bytes_in,
            bytes_out=state.bytes_out,
            encoding=encoding,
            strategy=strategy,
            clients=[]
            if secure
            else [
                ClientRecord(
                    id=r.client_id,
                    samples=r.num_samples,
                    samples_claimed=r.claimed_samples,
                    capped=r.num_samples < r.claimed_samples,
                    train_loss=r.metrics.get("train_loss"),
                    val_loss=r.metrics.get("val_loss"),
                    update_norm=r.update_norm,
                    clipped=r.clip_scale < 1.0,
                    bytes=r.bytes,
                    upload_s=round(r.upload_s, 3),
                )
                for r in results
            ],
            time=utc_iso(wall_time),
            reason=reason,
            deadline_extended_s=state.training.extended_s if state.training else 0.0,
            secure_aggregation=secure is not None,
            secagg=secure.summary() if secure else None,
            dp=dp,
        )

    @classmethod
    def recovered_round(
        cls, round_: int, version: int, *, encoding: str, strategy: str, wall_time: float
    ) -> RoundRecord:
        """A round whose checkpoint survived a crash but whose log line did not: the
        round happened, its details are lost."""
        return cls(
            round=round_, attempt=1, status="published", version=version,
            base_version=version - 1, encoding=encoding, strategy=strategy,
            time=utc_iso(wall_time), recovered=True, reason=RECOVERED_REASON,
        )  # fmt: skip


# Written after "time", when set.
_OPTIONAL = ("recovered", "reason", "deadline_extended_s", "secure_aggregation", "secagg",
             "dp", "other")  # fmt: skip


def _client(entry: dict[str, Any]) -> ClientRecord | dict[str, Any]:
    """A participant of a logged round; an entry of another schema is kept as read."""
    try:
        return ClientRecord(**entry)
    except TypeError:
        return dict(entry)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def utc_iso(wall_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_time))


def recover(
    round_log: RoundLog, version: int, checkpoint_round: int, *, encoding: str, strategy: str,
    wall_time: float,
) -> RoundRecord | None:  # fmt: skip
    """Make the round log agree with the checkpoints after a crash (kill -9 at any
    moment); return the record of the published ``version`` (None for version 0).

    A checkpoint is the publication point: it is renamed into place before the round
    is logged. So a crash can leave a torn last line, or a published version whose
    record never reached the log: it is logged now, marked ``recovered``.
    """
    if round_log.repair():
        log.warning("cut a torn last line from %s", round_log.path)
    if version == 0:
        return None
    logged = [r for r in round_log.read() if r.get("status") == "published"]
    found = next((r for r in reversed(logged) if r.get("version") == version), None)
    if found is not None:
        return RoundRecord.from_json(found)
    record = RoundRecord.recovered_round(
        checkpoint_round, version, encoding=encoding, strategy=strategy, wall_time=wall_time
    )
    round_log.append(record.to_json())
    round_log.echo_record(record.to_json())
    log.warning("round %d published version %d but was not logged before a crash: "
                "logged now (recovered)", checkpoint_round, version)  # fmt: skip
    return record
