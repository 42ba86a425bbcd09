"""A federation's PKI and an in-memory secure-aggregation round, shared by the secagg
protocol tests (test_secagg_signing.py, test_secagg_protocol.py, test_secagg_server.py).

Identities come from fedmae's own PKI (``init_certs`` + ``issue_client``): a root CA,
the enrollment CA, and client leaves whose client.pem holds leaf + enrollment CA, as
an enrolled site has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmae.pki.issue import init_certs, issue_client
from fedmae.secagg.aggregation import SecureSum
from fedmae.secagg.fixed_point import clip
from fedmae.secagg.messages import Roster, SecAggParams, UnmaskShares
from fedmae.secagg.signing import CertificateCheck
from fedmae.secagg.site import SiteRound

ROUND, ATTEMPT = 7, 0
# 25 sites x weight cap 64 x clip 0.5 leave 21 fractional bits in a 32-bit ring.
PARAMS = SecAggParams(ring_bits=32, frac_bits=21, clip=0.5, weight_cap=64)


@dataclass(frozen=True)
class Identity:
    client_id: str
    key_pem: bytes
    chain_pem: bytes  # client.pem: leaf, then the enrollment CA


class Pki:
    """A certificates directory and the client identities issued from it."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.certs = init_certs(directory / "certs")
        self.root_pem = self.certs.ca_cert.read_bytes()
        self._issued: dict[str, Identity] = {}

    def identity(self, client_id: str) -> Identity:
        if client_id not in self._issued:
            ident = issue_client(self.certs.dir, client_id, self.dir / client_id)
            self._issued[client_id] = Identity(
                client_id, ident.key.read_bytes(), ident.cert.read_bytes()
            )
        return self._issued[client_id]

    def check(self, now=None) -> CertificateCheck:
        return (
            CertificateCheck(self.root_pem) if now is None else CertificateCheck(self.root_pem, now)
        )


def site_names(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


@dataclass
class Inputs:
    """Each site's delta and sample count, and the weighted sum the round should give."""

    deltas: dict[str, np.ndarray]
    counts: dict[str, int]

    @classmethod
    def random(cls, names: Iterable[str], d: int, seed: int, params: SecAggParams = PARAMS):
        rng = np.random.default_rng(seed)
        names = list(names)
        deltas = {
            name: rng.uniform(-params.clip, params.clip, d).astype(np.float32) for name in names
        }
        # Some counts above the weight cap, so capping is exercised.
        counts = {name: int(rng.integers(1, 2 * params.weight_cap)) for name in names}
        return cls(deltas, counts)

    def expected(self, names: Iterable[str], params: SecAggParams) -> tuple[np.ndarray, int]:
        """(sum of min(count, cap) x clipped delta, sum of weights) over ``names``."""
        names = list(names)
        weights = {name: min(self.counts[name], params.weight_cap) for name in names}
        total = sum(weights[n] * clip(self.deltas[n], params.clip) for n in names)
        return total, sum(weights.values())


@dataclass
class InMemoryRound:
    """One round driven phase by phase, all in memory: the server (``SecureSum``) and each
    site (``SiteRound``). ``silent_after[name]`` is the last phase a site answers
    ("advertise", "share" or "mask"); a test may step the phases itself to tamper."""

    pki: Pki
    names: list[str]
    inputs: Inputs
    params: SecAggParams = PARAMS
    silent_after: Mapping[str, str] = field(default_factory=dict)
    graph_seed: bytes = b"a fixed graph for the test"

    def __post_init__(self):
        check = self.pki.check()
        d = next(iter(self.inputs.deltas.values())).size
        self.server = SecureSum(ROUND, ATTEMPT, self.params, d, check, seed=self.graph_seed)
        self.sites = {
            name: SiteRound(
                ROUND, ATTEMPT, name, self.params,
                self.pki.identity(name).key_pem, self.pki.identity(name).chain_pem,
                check, rng=np.random.default_rng(i),
            )
            for i, name in enumerate(self.names)
        }  # fmt: skip
        self.rosters: dict[str, Roster] = {}
        self.revealed: dict[str, UnmaskShares] = {}

    def _answers(self, phase: str, members: Iterable[str]) -> list[str]:
        order = ["advertise", "share", "mask", "unmask"]
        return [
            name
            for name in members
            if order.index(phase) <= order.index(self.silent_after.get(name, "unmask"))
        ]

    def advertise(self) -> None:
        for name in self.names:
            self.server.advertised(name, self.sites[name].advertise())
        self.server.close_advertising()

    def share(self) -> None:
        self.rosters = {name: self.server.roster(name) for name in self.names}
        for name in self._answers("share", self.names):
            self.server.shared(name, self.sites[name].share_keys(self.rosters[name]))
        self.server.close_sharing()

    def mask(self) -> None:
        sharers = self._answers("share", self.names)
        for name in self._answers("mask", sharers):
            site, inputs = self.sites[name], self.inputs
            ring = site.masked_input(
                self.server.inbound(name), inputs.deltas[name], inputs.counts[name]
            )
            self.server.add_masked(name, ring)
        self.server.close_masking()

    def unmask(self) -> None:
        for name in self._answers("unmask", self.server.survivors):
            answer = self.sites[name].unmask(self.server.unmask_request(name))
            self.revealed[name] = answer
            self.server.unmasked(name, answer)

    def run(self) -> tuple[np.ndarray, int]:
        self.advertise()
        self.share()
        self.mask()
        self.unmask()
        return self.server.result()
