"""The reports training writes beside the model: its curves and the threshold sweep as PNG
plots, the per-epoch history as CSV (metrics.json and threshold_sweep.json are the report's
JSON itself)."""

from __future__ import annotations

import csv
import io


def plot_training(history: list[dict], sweep: list[dict]) -> tuple[bytes, bytes]:
    """(training.png: losses, accuracies and memory use by epoch; threshold_sweep.png)."""
    import matplotlib  # only when a report is written: training without saving needs no plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(ep, [h["train_loss"] for h in history], "o-", label="total")
    ax[0, 0].plot(ep, [h["ce_loss"] for h in history], "o-", label="cross-entropy")
    ax[0, 0].set_title("training loss")
    ax[0, 1].plot(ep, [h["memory_loss"] for h in history], "o-", color="C2")
    ax[0, 1].set_title("memory (contrastive) loss")
    ax[1, 0].plot(ep, [h["train_accuracy"] for h in history], "o-", label="train (head)")
    ax[1, 0].plot(ep, [h["val_accuracy"] for h in history], "o-", label="validation (routed)")
    ax[1, 0].plot(ep, [h["val_head_accuracy"] for h in history], "o--", label="validation (head only)")
    ax[1, 0].set_title("accuracy")
    ax[1, 1].plot(ep, [h["memory_usage"] for h in history], "o-", label="memory-path share")
    ax[1, 1].plot(ep, [h["memory_fill"] for h in history], "o--", label="memory fill")
    ax[1, 1].set_title("memory usage")
    for a in ax.flat:
        a.set_xlabel("epoch")
        a.legend() if a.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)

    fig, a = plt.subplots(figsize=(6, 4))
    th = [s["threshold"] for s in sweep]
    a.plot(th, [s["memory_path_accuracy"] for s in sweep], "o-", label="memory-path accuracy")
    a.plot(th, [s["memory_usage"] for s in sweep], "o-", label="memory usage")
    a.plot(th, [s["accuracy"] for s in sweep], "o--", label="overall accuracy")
    a.set_xlabel("confidence threshold")
    a.legend()
    a.set_title("threshold sweep (validation split)")
    fig.tight_layout()
    buf2 = io.BytesIO()
    fig.savefig(buf2, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue(), buf2.getvalue()


def history_csv(rows: list[dict]) -> bytes:
    """metrics.csv: one row per epoch, the columns of the history's rows."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()
