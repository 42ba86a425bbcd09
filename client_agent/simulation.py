"""Many virtual sites in one process: a simulation worker (``fedmae simulate``).

Each virtual site is a ``SiteSession`` with its own enrolled identity, its own mTLS
channel (its own TCP connection: no subchannel is shared between sites) and its own
event stream, so the aggregator sees exactly what it would see of real sites. What the
sites share is what a real site would own but only needs while it trains:

- the data: the dataset is loaded once as uint8; a site holds only the indices of its
  shard (8 bytes an image) and turns them into float tensors while it trains;
- the model: ``train_slots`` trainers (model, AdamW, the fetched global model) lent to
  the selected sites one task at a time. AdamW's state is reset for every task: keeping
  it per site would cost two model sizes for every site, idle or not.

A secure round keeps each trained site's delta until it is masked (``SecureRounds``):
one model size per site selected in that round, for the length of the round.

The first ``malicious`` sites poison what they send (``client_agent.attacks``), over
the same protocol and connection as an honest site: the aggregator cannot tell.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client_agent.agent import AgentConfig, SiteSession
from client_agent.attacks import DEFAULT_SCALE, Attack
from client_agent.trainer import SiteImages, Trained, TrainerPool
from fedmae.ml.datasets import ImageDataset
from fedmae.ml.loaders import load_dataset
from fedmae.ml.partitions import shard_indices, train_val_indices
from fedmae.rounds import RoundTask, RunFinished
from fedmae.runtime import release_free_memory
from fedmae.transport.federation_client import FederationClient

log = logging.getLogger(__name__)

# Its own TCP connection per site, as on separate machines (gRPC would otherwise share
# one between channels to the same address with equal arguments).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker hosts: written as JSON by ``fedmae simulate``."""

    server: str
    sites: list[tuple[int, str]]  # (index among all sites, identity directory)
    num_sites: int
    data: str = "fashion-mnist"
    limit: int | None = None  # images over all sites (a seeded subset)
    dirichlet: float | None = None
    seed: int = 0
    train_slots: int = 1
    threads: int = 1
    give_up_after_s: float = 60.0
    dump_dir: str | None = None  # tests: each upload's delta and weight, as .npz
    malicious: int = 0  # sites 0 .. malicious-1 poison their updates
    attack: str = "scale"  # client_agent.attacks.ATTACKS
    attack_scale: float = DEFAULT_SCALE

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        raw = json.loads(path.read_text())
        raw["sites"] = [(int(i), str(d)) for i, d in raw["sites"]]
        return cls(**raw)


def site_images(dataset: ImageDataset, spec: WorkerSpec) -> dict[int, SiteImages]:
    """Each hosted site's images, as indices into ``dataset`` (shards of all
    ``num_sites``, the same as ``fedmae client --partition K/N`` would take)."""
    shards = shard_indices(
        dataset, spec.num_sites, dirichlet_alpha=spec.dirichlet, seed=spec.seed, limit=spec.limit
    )
    out = {}
    for index, _ in spec.sites:
        train_idx, val_idx = train_val_indices(
            dataset, shards[index], index, spec.num_sites, seed=spec.seed
        )

        def load(train_idx=train_idx, val_idx=val_idx) -> tuple[torch.Tensor, torch.Tensor]:
            return dataset.to_tensor(train_idx), dataset.to_tensor(val_idx)

        out[index] = SiteImages(int(train_idx.size), int(val_idx.size), load)
    return out


class VirtualSite(SiteSession):
    """A site of a simulation: the agent's session, optionally writing each update's
    delta and weight to ``dump_dir`` (for tests that recompute the aggregate), and
    optionally malicious (``attack``: it sends a poisoned update, plain or secure)."""

    def __init__(self, config, images, trainers, dump_dir: Path | None, attack=None):
        super().__init__(config, images, trainers)
        self.dump_dir = dump_dir
        self.attack: Attack | None = attack

    def _train(self, client: FederationClient, task: RoundTask) -> Trained:
        trained = super()._train(client, task)
        # Training leaves the heap full of freed activations; the next site's training
        # comes from another thread, so hand them back (glibc malloc_trim).
        release_free_memory()
        if self.attack is not None:
            trained = self.attack.poison(trained, self.client_id, task.round)
        return trained

    def _final_model(self, client: FederationClient, done: RunFinished) -> None:
        super()._final_model(client, done)  # every site at once at the end of the run
        release_free_memory()

    def _upload(self, client: FederationClient, task: RoundTask, trained: Trained) -> None:
        if self.dump_dir is not None:
            np.savez(
                self.dump_dir / f"r{task.round}-a{task.attempt}-{self.client_id}.npz",
                delta=trained.delta.numpy(),
                num_samples=trained.result.num_samples,
            )
        super()._upload(client, task, trained)


class Worker:
    """The virtual sites of one worker process, each on a thread of its own."""

    def __init__(self, spec: WorkerSpec):
        torch.set_num_threads(max(1, spec.threads))
        dataset = load_dataset(spec.data)
        images = site_images(dataset, spec)
        trainers = TrainerPool(spec.train_slots, keep_optimizer=False)
        dump = Path(spec.dump_dir) if spec.dump_dir else None
        attack = Attack(spec.attack, spec.attack_scale)
        self.sites = [
            VirtualSite(
                AgentConfig(
                    server=spec.server,
                    identity=Path(identity),
                    give_up_after_s=spec.give_up_after_s,
                    seed=spec.seed,
                    channel_options=OWN_CONNECTION,
                ),
                images[index],
                trainers,
                dump,
                attack if index < spec.malicious else None,
            )
            for index, identity in spec.sites
        ]
        self.exit_codes: dict[str, int] = {}

    def run(self) -> int:
        """Run every site until the run ends (or ``stop``); 0 if every site ended well."""
        threads = [
            threading.Thread(target=self._run_site, args=(s,), name=s.client_id, daemon=True)
            for s in self.sites
        ]
        for t in threads:
            t.start()
        log.info("worker: %d virtual sites started", len(threads))
        for t in threads:
            t.join()
        failed = {k: v for k, v in self.exit_codes.items() if v != 0}
        if failed:
            log.error("worker: %d sites ended with errors: %s", len(failed), failed)
        return 1 if failed else 0

    def _run_site(self, site: SiteSession) -> None:
        try:
            self.exit_codes[site.client_id] = site.run()
        except Exception:  # noqa: BLE001 - one site's bug must not hide the others'
            log.exception("%s: the site failed", site.client_id)
            self.exit_codes[site.client_id] = 1

    def stop(self) -> None:
        for site in self.sites:
            site.stop()
