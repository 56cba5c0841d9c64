"""The loss curve of a run's train_log.jsonl as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_with


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in rows if "loss" in r]  # a fine-tune's step-0 row holds only the starting validation
    ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], lw=0.8, label="train loss")
    ev = [r for r in rows if "val_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
