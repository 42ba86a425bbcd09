"""``fedmae report``: PNG plots of a run, MAE reconstructions, and a markdown summary.

Reads only the state directory (``rounds.jsonl`` and the latest checkpoint), so it
works on a running or a finished aggregator, or on a copy of its state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aggregator_service.checkpoint_store import CheckpointStore  # noqa: E402
from fedmae.admin_view import dp_line  # noqa: E402
from fedmae.cli.checkpoints import load_checkpoint  # noqa: E402
from fedmae.errors import ConfigError  # noqa: E402
from fedmae.ml.loaders import load_dataset  # noqa: E402
from fedmae.ml.model_state import load_trainable_state, trainable_state  # noqa: E402
from fedmae.ml.model_zoo import build_model  # noqa: E402
from fedmae.ml.probe import ProbeConfig, ProbeResult, linear_probe  # noqa: E402
from fedmae.payload.layout import ModelLayout  # noqa: E402

log = logging.getLogger(__name__)

PHASES = ("waiting", "training", "aggregation", "checkpoint", "evaluation", "publish")


@dataclass(frozen=True)
class Report:
    summary: Path
    images: list[Path]
    rounds: int
    first_val_loss: float | None
    last_val_loss: float | None
    probe: ProbeResult | None = None


def read_rounds(state_dir: Path) -> list[dict]:
    path = state_dir / "rounds.jsonl"
    if not path.exists():
        raise ConfigError(f"no round log at {path}: is {state_dir} an aggregator state dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _published(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "published"]


def plot_losses(records: list[dict], out: Path) -> Path:
    pub = _published(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train (clients, weighted)"),
                       ("val_loss", "validation (clients, weighted)"),
                       ("eval_loss", "global evaluation (server)")):  # fmt: skip
        pts = [(r["round"], r[key]) for r in pub if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("Loss per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    spent = [(r["round"], r["dp"]["epsilon"]) for r in pub if r.get("dp")]
    if spent:  # under --dp only: the privacy ledger's ε after each round, on its own axis
        eps = ax.twinx()
        eps.plot(*zip(*spent, strict=True), "k--", marker=".", label="ε spent (privacy ledger)")
        eps.set_ylabel(f"ε at δ = {pub[-1]['dp']['delta']:g}")
        eps.legend(loc="upper right")
    return _save(fig, out / "loss.png")


def plot_phases(records: list[dict], out: Path) -> Path:
    fig, ax, x = _per_round(records)
    bottom = np.zeros(len(records))
    for phase in PHASES:
        vals = np.array([r.get("phases", {}).get(f"{phase}_s", 0.0) for r in records])
        if vals.any():
            ax.bar(x, vals, bottom=bottom, label=phase)
            bottom += vals
    return _save_per_round(fig, ax, "seconds", "Round duration by phase", out / "phases.png")


def plot_bytes(records: list[dict], out: Path) -> Path:
    fig, ax, x = _per_round(records)
    ax.bar(x - 0.2, [r["bytes_in"] / 1e6 for r in records], 0.4, label="updates in")
    ax.bar(x + 0.2, [r["bytes_out"] / 1e6 for r in records], 0.4, label="models out")
    return _save_per_round(fig, ax, "MB", "Bytes per round", out / "bytes.png")


def plot_clients(records: list[dict], out: Path) -> Path:
    fig, ax, x = _per_round(records)
    series = {
        "participants": [len(r["participants"]) for r in records],
        "dropped": [len(r["dropped"]) for r in records],
        "rejected": [len(r["rejected"]) for r in records],
    }
    bottom = np.zeros(len(records))
    for name, vals in series.items():
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom += np.array(vals)
    ax.plot(x, [len(r["selected"]) for r in records], "k_", markersize=20, label="selected")
    return _save_per_round(fig, ax, "clients", "Clients per round", out / "clients.png")


def plot_reconstructions(
    state_dir: Path, out: Path, data: str = "fashion-mnist", count: int = 8, seed: int = 0
) -> tuple[Path, float]:
    """Original / masked / reconstructed held-out images from the latest checkpoint."""
    store = CheckpointStore(state_dir / "checkpoints")
    version = store.latest()
    if version is None:
        raise ConfigError(f"no checkpoint in {store.dir}")
    model_name = store.describe(version).model or "tiny"
    model = build_model(model_name, seed=0)
    layout = ModelLayout.from_state(trainable_state(model))
    _, flat = store.load(version, layout)
    load_trainable_state(model, layout.unflatten(flat))
    model.eval()
    dataset = load_dataset(data, split="test")
    imgs = dataset.to_tensor(list(range(count)))  # [N, C, H, W], normalised
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        loss, pred, mask = model(imgs, generator=gen)  # pred [N, L, p*p*C], mask [N, L]
        if model.config.norm_pix_loss:  # predictions are per-patch normalised: undo it
            target = model.patchify(imgs)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        recon = model.unpatchify(pred)
        m = mask.unsqueeze(-1).expand_as(model.patchify(imgs))
        m = model.unpatchify(m)  # 1 where a patch was removed
        masked = imgs * (1 - m)
        pasted = imgs * (1 - m) + recon * m  # the MAE paper's visualisation
    denorm = lambda t: (t * dataset.std + dataset.mean).clamp(0, 1)  # noqa: E731
    rows = [("original", denorm(imgs)), ("masked 75%", denorm(masked) * (1 - m) + 0.5 * m),
            ("reconstruction", denorm(pasted))]  # fmt: skip
    fig, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.6))
    for i, (title, batch) in enumerate(rows):
        for j in range(count):
            img = batch[j].permute(1, 2, 0).numpy()
            axes[i, j].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray",
                              vmin=0, vmax=1)  # fmt: skip
            axes[i, j].axis("off")
        axes[i, 0].set_title(title, loc="left", fontsize=9)
    fig.suptitle(f"MAE reconstructions, model version {version} (held-out {dataset.name})")
    return _save(fig, out / "reconstructions.png"), float(loss)


def probe_latest(state_dir: Path, cfg: ProbeConfig, data: str) -> tuple[int, ProbeResult]:
    """Linear-probe accuracy of the latest checkpoint's encoder (fedmae.ml.probe)."""
    store = CheckpointStore(state_dir / "checkpoints")
    version = store.latest()
    if version is None:
        raise ConfigError(f"no checkpoint in {store.dir}")
    model = load_checkpoint(store, version).model
    train, test = load_dataset(data, split="train"), load_dataset(data, split="test")
    return version, linear_probe(model, train, test, cfg)


def write_report(
    state_dir: Path,
    out: Path,
    data: str = "fashion-mnist",
    probe: ProbeConfig | None = None,
    probe_data: str = "fashion-mnist",
) -> Report:
    """Plots and ``summary.md``; with ``probe``, also the latest encoder's linear probe."""
    records = read_rounds(state_dir)
    if not records:
        raise ConfigError(f"{state_dir / 'rounds.jsonl'} is empty: no round has closed yet")
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_losses(records, out), plot_phases(records, out), plot_bytes(records, out),
              plot_clients(records, out)]  # fmt: skip
    recon, recon_loss = plot_reconstructions(state_dir, out, data)
    images.append(recon)
    pub = _published(records)
    first = pub[0] if pub else None
    last = pub[-1] if pub else None
    lines = [
        "# fedmae run report",
        "",
        f"- state directory: `{state_dir}`",
        f"- rounds published: {len(pub)} (records: {len(records)}, failed or aborted: "
        f"{len(records) - len(pub)})",
    ]
    if first and last:
        lines += [
            f"- clients per round: {min(len(r['participants']) for r in pub)}–"
            f"{max(len(r['participants']) for r in pub)}; samples per round: "
            f"{last['num_samples']}",
            f"- validation loss (clients, sample-weighted): round {first['round']} "
            f"{_num(first['val_loss'])} → round {last['round']} {_num(last['val_loss'])}"
            + (
                " (a secure round reports no site's loss)" if last.get("secure_aggregation") else ""
            ),
            f"- global model on held-out images (server): round {first['round']} "
            f"{_num(first.get('eval_loss'))} → round {last['round']} "
            f"{_num(last.get('eval_loss'))}",
            f"- latest model version: {last['version']}; its masked-patch MSE on the "
            f"reconstruction images: {recon_loss:.4f}",
            f"- bytes: {sum(r['bytes_in'] for r in records) / 1e6:.1f} MB of updates in, "
            f"{sum(r['bytes_out'] for r in records) / 1e6:.1f} MB of models out",
            f"- total round time: {sum(r['duration_s'] for r in records):.1f} s",
        ]
        if last.get("dp"):  # never an ε for a run without DP
            lines.append(f"- differential privacy: {dp_line(last['dp'])}")
    probed = None
    if probe is not None:
        probe_version, probed = probe_latest(state_dir, probe, probe_data)
        lines.append(
            f"- linear probe of version {probe_version}'s frozen encoder ({probed.features} "
            f"features, {probed.train_images} train / {probed.test_images} test images): "
            f"test accuracy {probed.test_accuracy:.4f}"
        )
    private = any(r.get("dp") for r in records)  # an ε column only under --dp
    lines += ["", "| round | status | version | clients | samples | train | val | eval | s |"
              + (" ε |" if private else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if private else "")]  # fmt: skip
    for r in records:
        lines.append(
            f"| {_label(r)} | {r['status']} | {r['version']} | {len(r['participants'])} | "
            f"{r['num_samples']} | {_num(r['train_loss'])} | {_num(r['val_loss'])} | "
            f"{_num(r.get('eval_loss'))} | {r['duration_s']:.1f} |"
            + (f" {_num((r.get('dp') or {}).get('epsilon'))} |" if private else "")
        )
    lines.append("")
    for img in images:
        lines += [f"![{img.stem}]({img.name})", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    log.info("report written to %s", summary)
    return Report(summary, images, len(pub), first and first["val_loss"],
                  last and last["val_loss"], probed)  # fmt: skip


def _label(r: dict) -> str:
    return f"{r['round']}" + (f".{r['attempt']}" if r.get("attempt", 1) > 1 else "")


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _per_round(records: list[dict]):
    """A bar chart's figure, axes and x positions, one per round record, labelled."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(records))
    ax.set_xticks(x, [_label(r) for r in records], rotation=45 if len(records) > 12 else 0)
    return fig, ax, x


def _save_per_round(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
