"""What a malicious site sends: poisoned updates, for trying defences in a simulation.

``fedmae simulate --malicious K --attack NAME`` makes its first K sites poison every
update they send. They train honestly, then change what goes on the wire; everything
else (identity, connection, protocol) is an honest site's, so the aggregator gets no
hint beyond the update itself. The four attacks are the issue's (docs/privacy.md,
"Robust aggregation"):

- ``scale``: the delta times ``scale`` (100): a model-replacement push;
- ``signflip``: minus the delta: gradient ascent on the honest objective;
- ``noise``: Gaussian noise with the delta's own L2 norm: an update that carries
  nothing, the size of an honest one;
- ``claim``: the honest delta, but a claimed sample count of 2^40, to take FedAvg's
  weighted mean.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI's parser reads ATTACKS: no torch at import
    from client_agent.trainer import Trained

ATTACKS = ("scale", "signflip", "noise", "claim")
CLAIMED_SAMPLES = 2**40
DEFAULT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str = "scale"
    scale: float = DEFAULT_SCALE  # for ``scale``

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; one of {', '.join(ATTACKS)}")

    def poison(self, trained: Trained, site: str, round_: int) -> Trained:
        """The update a malicious ``site`` sends in ``round_`` instead of ``trained``."""
        delta = trained.delta
        if self.name == "scale":
            return dataclasses.replace(trained, delta=delta * self.scale)
        if self.name == "signflip":
            return dataclasses.replace(trained, delta=-delta)
        if self.name == "noise":
            import torch

            # Seeded per site and round: a rerun sends the same noise.
            gen = torch.Generator().manual_seed(zlib.crc32(f"noise/{site}/{round_}".encode()))
            noise = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
            noise *= delta.double().norm() / noise.norm()
            return dataclasses.replace(trained, delta=noise.to(delta.dtype))
        result = dataclasses.replace(trained.result, num_samples=CLAIMED_SAMPLES)
        return dataclasses.replace(trained, result=result)
