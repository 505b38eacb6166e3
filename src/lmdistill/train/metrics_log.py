"""Training metrics: JSONL (one line per logged step), TensorBoard, and a PNG of the curves."""

from __future__ import annotations

from pathlib import Path

from lmdistill.io import JsonlAppender, atomic_open, read_jsonl, write_jsonl


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True, truncate_after: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if truncate_after and path.exists():   # a resumed run rewrites what came after its checkpoint
            write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= truncate_after])
        elif path.exists() and not truncate_after:
            path.unlink()
        self.jsonl = JsonlAppender(path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard missing: JSONL still has everything
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.append({"step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def plot_curves(metrics_path: Path | None, out_png: Path, runs: dict[str, Path] | None = None) -> Path:
    """Loss (and validation loss / ROUGE-L when logged) against step; several runs share the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs or {"": metrics_path}
    keys = [("loss", "training objective (method-specific scale)"), ("val/loss", "validation loss (SFT on valid)"),
            ("val/rougeL", "validation ROUGE-L")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for label, path in runs.items():
        if not Path(path).exists():
            continue
        rows = read_jsonl(path)
        for ax, (key, title) in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("val") else None, markersize=3, label=label or None)
            ax.set_title(title)
            ax.set_xlabel("step")
    if any(runs):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_png
