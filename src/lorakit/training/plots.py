"""Loss curves (matplotlib, headless): `lorakit plot` and the picture in an adapter's model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

SIZE = (9, 5)  # inches, at DPI: a 900 x 500 PNG
DPI = 100
CURVE_FILE = "loss.png"  # in an adapter's folder, linked from its model card
METRICS_COPY = "metrics.jsonl"  # the run's log, kept with the adapter


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def metrics_of(name: str, runs_dir: str | Path, store: str | Path) -> list[dict[str, Any]]:
    """A run's log rows (runs/<name>/metrics.jsonl), else the copy kept with adapter `name` in the store."""
    from lorakit.training.history import metrics_rows

    for folder in (Path(runs_dir) / name, Path(store) / name):
        rows = metrics_rows(folder)
        if rows:
            return rows
    raise LorakitError(f"{name!r}: no run log in {Path(runs_dir) / name} and no adapter log in {Path(store) / name}")


def plot_runs(series: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """One chart: train loss raw (faint) and smoothed, eval loss (markers) per run; learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise LorakitError(f"--out {out}: give a .png file")
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    lr_ax = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(series.items()):
        c = colors[i % len(colors)]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        lrs = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
        if train:
            steps, losses = zip(*train, strict=True)
            ax.plot(steps, losses, color=c, alpha=0.3, linewidth=1)
            ax.plot(steps, smooth(list(losses)), color=c, linewidth=2, label=f"{name}: train loss (smoothed)")
        if evals:
            steps, losses = zip(*evals, strict=True)
            ax.plot(steps, losses, color=c, marker="o", linestyle="--", label=f"{name}: eval loss")
        if lrs:
            steps, values = zip(*lrs, strict=True)
            lr_ax.plot(steps, values, color=c, linestyle=":", linewidth=1, label=f"{name}: learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()
    more = lr_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    import os

    tmp = out.parent / f".{out.name}.tmp"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as e:
        raise LorakitError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
