"""Secure rounds over real mTLS: the published model is the weighted mean of the sites'
deltas within the documented bound, the server's view of each site is noise, and a
site that misbehaves is excluded while the honest ones still publish."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
import torch
from federation_harness import wait_until
from secure_sites import SecureFederation, SecureSite, weighted_mean

from aggregator_service.strategies import StrategyOptions
from fedmae.errors import FedmaeError
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import Phase, RoundTask
from fedmae.secagg.aggregation import SecureSum
from fedmae.secagg.fixed_point import encode
from fedmae.secagg.keys import generate_site_keys, public_bytes
from fedmae.secagg.messages import UnmaskShares
from fedmae.secagg.site import SiteRound
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.status import status_name, wrap_behaviour

TIMEOUT = 120.0


def _deltas(layout: ModelLayout, names: list[str], scale: float = 0.01) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    return {
        n: torch.from_numpy((rng.standard_normal(layout.numel) * scale).astype(np.float32))
        for n in names
    }


@pytest.mark.parametrize(
    ("sites", "model"),
    [(3, "tiny"), (10, "blob:40000"), (50, "blob:20000")],
    ids=["3-sites-tiny", "10-sites", "50-sites-sparse"],
)
def test_a_secure_round_publishes_the_weighted_mean_within_the_bound(tmp_path, sites, model):
    names = [f"site-{k:02d}" for k in range(sites)]
    fed = SecureFederation(tmp_path, names, model=model)
    try:
        deltas = _deltas(fed.layout, names)
        deltas[names[0]][:5] = torch.tensor([3.0, -3.0, 0.9, -0.9, 0.0])  # clipped to [-1, 1]
        samples = {n: 100 + 37 * k for k, n in enumerate(names)}
        samples[names[-1]] = 50_000  # over the weight cap (10,000): weighs 10,000
        [record] = fed.run(deltas, samples)
        assert record["status"] == "published", record.get("reason")
        cap = fed.server.rounds.bounds.cap
        expected = fed.theta0 + weighted_mean(deltas, samples, clip=1.0, cap=cap)
        total = sum(min(n, cap) for n in samples.values())
        err = np.abs(fed.published() - expected)
        assert (err <= fed.bound(sites, total)).all(), float(err.max())
        # What the round log keeps of a secure round: the sum's weight, nothing per site.
        assert record["secure_aggregation"] is True and record["num_samples"] == total
        assert record["clients"] == [] and record["update_norm"] is None
        assert record["train_loss"] is None and record["val_loss"] is None
        assert record["secagg"]["ring_bits"] == 32
        assert record["secagg"]["masked_input"] == sites
        # Up to 20 sites the graph is complete; above, SecAgg+'s sparse one (k ~ 3 log2 n).
        assert record["secagg"]["neighbours"] == (sites - 1 if sites <= 20 else 18)
        for site in fed.sites.values():  # every site heard the round close, without lists
            wait_until(lambda s=site: s.closed, "RoundClosed at each site")
            assert site.error is None
            assert site.closed[0].success and site.closed[0].version == 1
    finally:
        fed.close()


class Recorder(grpc.ServerInterceptor):
    """Every request byte the aggregator's mTLS port receives, per call and client."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[bytes]]] = []  # (method, client CN, messages)

    def intercept_service(self, continuation, details):
        handler = continuation(details)  # once per call: the list below is this call's
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        received: list[bytes] = []

        def recording(data: bytes):
            received.append(bytes(data))
            return deserialize(data)

        def wrap(behaviour, _streaming):
            def call(request, context):
                names = context.auth_context().get("x509_common_name") or [b""]
                self.calls.append((details.method, names[0].decode(), received))
                return behaviour(request, context)

            return call

        return wrap_behaviour(handler, wrap)._replace(request_deserializer=recording)

    def masked_inputs(self) -> dict[str, np.ndarray]:
        """Each client's masked input as it arrived (the chunks of its ring upload)."""
        out = {}
        for method, client, raw in self.calls:
            if not method.endswith("SubmitUpdate"):
                continue
            msgs = [pb.UpdateMessage.FromString(r) for r in raw]
            if msgs and msgs[0].WhichOneof("part") == "header":
                data = b"".join(m.chunk.data for m in msgs if m.WhichOneof("part") == "chunk")
                out[client] = np.frombuffer(data, dtype="<u4")
        return out


CHI2_255_AT_1E6 = 377.2  # chi-square, 255 degrees of freedom: P(X > 377.2) = 1e-6


def _chi_square(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_secure_fedadam_round_steps_from_the_secure_mean(tmp_path):
    """A server optimizer folds the unmasked mean like FedAvg does, then steps:
    θ1 = θ0 + η·m/(√v + τ), m = (1−β1)·Δ, v = β2·τ² + (1−β2)·Δ² (m0 = 0, v0 = τ²)."""
    names = ["a", "b", "c"]
    fed = SecureFederation(tmp_path, names, strategy="fedadam",
                           options=StrategyOptions(server_lr=0.01))  # fmt: skip
    try:
        deltas = _deltas(fed.layout, names)
        samples = {"a": 100, "b": 137, "c": 174}
        [record] = fed.run(deltas, samples)
        assert record["status"] == "published" and record["strategy"] == "fedadam"
        mean = weighted_mean(deltas, samples, clip=1.0, cap=fed.server.rounds.bounds.cap)
        eta, beta1, beta2, tau = 0.01, 0.9, 0.99, 1e-3
        m, v = (1 - beta1) * mean, beta2 * tau**2 + (1 - beta2) * mean**2
        expected = fed.theta0 + eta * m / (np.sqrt(v) + tau)
        # The step's slope in Δ is at most η(1−β1)/(τ(1+√β2)) ≈ 0.5: the mean's
        # quantization error shrinks through it, so the secure bound still holds.
        err = np.abs(fed.published() - expected)
        assert (err <= fed.bound(3, sum(samples.values()))).all(), float(err.max())
    finally:
        fed.close()


def test_the_server_sees_noise_from_each_site_and_the_exact_sum(tmp_path):
    names = ["site-a", "site-b", "site-c"]
    recorder = Recorder()
    fed = SecureFederation(tmp_path, names, interceptors=(recorder,))
    try:
        deltas = _deltas(fed.layout, names, scale=0.02)
        samples = {"site-a": 300, "site-b": 500, "site-c": 700}
        [record] = fed.run(deltas, samples)
        assert record["status"] == "published", record.get("reason")
        d = fed.layout.numel
        # The aggregate is exact (within the bound) ...
        expected = fed.theta0 + weighted_mean(deltas, samples, clip=1.0, cap=10_000)
        assert (np.abs(fed.published() - expected) <= fed.bound(3, 1500)).all()
        # ... while no masked input correlates with any site's delta: under independence
        # Pearson r ~ N(0, 1/d), so |r| < 5/sqrt(d) fails by chance once in 1.7 million.
        masked = recorder.masked_inputs()
        assert sorted(masked) == names and all(m.size == d + 1 for m in masked.values())
        bound = 5 / np.sqrt(d)
        for site, y in masked.items():
            for values in (y[:d].astype(np.float64), y[:d].view(np.int32).astype(np.float64)):
                for other, delta in deltas.items():
                    r = np.corrcoef(values, delta.numpy().astype(np.float64))[0, 1]
                    assert abs(r) < bound, (site, other, r)
            # and its bytes are uniform.
            assert _chi_square(y.tobytes()) < CHI2_255_AT_1E6, site
        # The test has power: the same delta encoded without masks correlates fully.
        clear = encode(deltas["site-a"].numpy(), 1.0, 20, 32, weight=300).view(np.int32)
        assert np.corrcoef(clear.astype(np.float64), deltas["site-a"].numpy())[0, 1] > 0.99
        # Nothing the server received or keeps holds any run of a delta's bytes.
        received = b"".join(b for _, _, raw in recorder.calls for b in raw)
        kept = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
        for delta in deltas.values():
            raw = delta.numpy().tobytes()
            for start in range(0, len(raw) - 32, len(raw) // 50):
                window = raw[start : start + 32]
                assert window not in received and window not in kept
        # What it keeps of the round: counts and the aggregate's weight, nothing per site.
        assert record["clients"] == [] and record["update_norm"] is None
        assert fed.server.rounds.state.secure.sum._sum is None  # the masked sum is freed
    finally:
        fed.close()


class Mallory(SecureSite):
    """A site that answers one phase badly (``case``) and records what it was told."""

    def __init__(self, *args, case: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.case = case
        self.refused: list[str] = []  # status names of the refusals it got
        self.round1_keys = None

    def _answer(self, task: RoundTask) -> None:
        secure, client = self.secure, self.client
        if task.phase == Phase.ADVERTISE_KEYS:
            if self.case == "replay" and task.round == 2:
                return self._send(self.round1_keys)  # last round's signed keys, again
            if self.case == "bad-signature":
                site = SiteRound(task.round, task.attempt, self.name_, task.secagg,
                                 secure._key_pem, secure._chain_pem, secure._check)  # fmt: skip
                keys = site.advertise()
                return self._send(
                    dataclasses.replace(keys, signature=keys.signature[:-2] + b"\0\0")
                )
            self.secure.trained(client, task, self.deltas[task.round], self.samples[task.round])
            self.round1_keys = self.round1_keys or secure.current.answers[task.phase]
            return
        now = secure.current
        if self.case == "malformed-share" and task.phase == Phase.SHARE_KEYS:
            shares = now.site.share_keys(task.phase_data)
            bad = dataclasses.replace(shares.shares[0], ciphertext=b"short")
            return self._send(dataclasses.replace(shares, shares=(bad, *shares.shares[1:])))
        if self.case == "out-of-turn" and task.phase == Phase.SHARE_KEYS:
            return self._send(UnmaskShares(task.round, task.attempt, (), ()))
        if self.case == "wrong-size" and task.phase == Phase.MASKED_INPUT:
            ring = now.site.masked_input(task.phase_data, now.delta, 100)
            try:
                client.submit_masked_input(ring[:-1], round_=task.round,
                                           base_version=task.model_version)  # fmt: skip
            except FedmaeError as err:
                self.refused.append(status_name(err))
            return
        super()._answer(task)

    def _send(self, message) -> None:
        try:
            self.client.send_secagg(message)
        except FedmaeError as err:
            self.refused.append(status_name(err))


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("bad-signature", "INVALID_ARGUMENT"),
        ("malformed-share", "INVALID_ARGUMENT"),
        ("out-of-turn", "FAILED_PRECONDITION"),
        ("wrong-size", "INVALID_ARGUMENT"),
        ("replay", "FAILED_PRECONDITION"),
    ],
)
def test_a_misbehaving_site_is_refused_and_excluded_and_the_honest_ones_publish(
    tmp_path, case, code
):
    names = ["honest-1", "honest-2", "honest-3", "mallory"]
    rounds = 2 if case == "replay" else 1
    # A replaying site is connected and never answers round 2: that round waits for its
    # deadline (kept short here) and goes on with the three.
    timeout = {"round_timeout_s": 8.0} if case == "replay" else {}
    fed = SecureFederation(tmp_path, names, model="blob:30000", rounds=rounds, min_updates=3,
                           **timeout)  # fmt: skip
    try:
        deltas = {r: _deltas(fed.layout, names) for r in (1, 2)}
        samples = {"honest-1": 100, "honest-2": 200, "honest-3": 300, "mallory": 400}
        for n in names:
            kind = Mallory if n == "mallory" else SecureSite
            extra = {"case": case} if n == "mallory" else {}
            fed.sites[n] = kind(fed.port, fed.ids[n], {r: deltas[r][n] for r in (1, 2)},
                                {1: samples[n], 2: samples[n]}, **extra)  # fmt: skip
            fed.sites[n].start()
        records = wait_until(lambda: len(fed.records()) >= rounds and fed.records(),
                             "the rounds' records", timeout=TIMEOUT)  # fmt: skip
        last = records[-1]
        assert [r["status"] for r in records] == ["published"] * rounds, last.get("reason")
        assert fed.sites["mallory"].refused == [code]
        assert "mallory" not in last["participants"]
        if case != "replay":  # a replay changes nothing: it is just not an answer
            assert "mallory" in last["secagg"]["excluded"]
        honest = {n: deltas[rounds][n] for n in names[:3]}
        before = fed.theta0 if rounds == 1 else None
        if before is not None:
            honest_samples = {n: samples[n] for n in honest}
            expected = before + weighted_mean(honest, honest_samples, clip=1.0, cap=10_000)
            assert (np.abs(fed.published() - expected) <= fed.bound(3, 600)).all()
        wait_until(lambda: fed.server.rounds.status()["state"] == "finished",
                   "the run to finish (the server up throughout)")  # fmt: skip
    finally:
        fed.close()


def test_a_server_that_swaps_a_key_is_caught_and_the_round_aborts(tmp_path, monkeypatch):
    names = ["site-a", "site-b", "site-c"]
    honest_roster = SecureSum.roster

    def swapped(self, client_id):  # a dishonest server: its own key in place of a peer's
        roster = honest_roster(self, client_id)
        peer = roster.peers[0]
        fake = dataclasses.replace(peer.keys, mask_public=public_bytes(generate_site_keys().mask))
        return dataclasses.replace(roster, peers=(dataclasses.replace(peer, keys=fake),
                                                  *roster.peers[1:]))  # fmt: skip

    monkeypatch.setattr(SecureSum, "roster", swapped)
    fed = SecureFederation(tmp_path, names, model="blob:30000", max_attempts=1)
    try:
        deltas = _deltas(fed.layout, names)
        [record] = fed.run(deltas, {n: 100 for n in names})
        assert record["status"] == "failed"
        assert "aborted secure aggregation" in record["reason"]
        assert "do not verify" in record["reason"] or "signature" in record["reason"]
        assert fed.server.rounds.version == 0  # nothing published, nothing unmasked
    finally:
        fed.close()
