"""The loss curve of a healing run (a PNG for the model card)."""

from __future__ import annotations

from pathlib import Path


def loss_curve(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["held_back_loss"]) for h in history if "held_back_loss" in h]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", alpha=0.6)
    kl = [(h["step"], h["held_back_kl"]) for h in history if "held_back_kl" in h]
    ax.plot(*zip(*kl), "s-", color="C2", label="held-back KL to the teacher")
    ax2 = ax.twinx()
    ax2.plot(*zip(*held), "o-", color="C1", label="held-back next-token loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, KL (nats)")
    ax2.set_ylabel("held-back loss (nats)")
    ax.set_title("tailorkit heal")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
