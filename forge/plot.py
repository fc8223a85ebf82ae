"""Pictures of training runs for people without W&B: loss, lr, tokens/s and MFU from metrics.jsonl.

    python -m forge.plot out-shakespeare-char                      # -> out-shakespeare-char/metrics.png
    python -m forge.plot out-a out-b --out=compare.png             # several runs overlaid
    python -m forge.plot out-a out-b --labels=baseline,muon --x=tokens

Reads what the training loop writes: `metrics.jsonl` (one JSON object per log or eval step:
`iter`, `loss`, `lr`, `tokens_per_sec`, `mfu`, and for evals `train_loss`, `val_loss`, and
`hellaswag_acc_norm` when enabled) and, when present, `train_config.json` (the resolved config), from which the tokens seen per iteration
are `batch_size * block_size * gradient_accumulation_steps` (the global batch, whatever the
world size). matplotlib is an optional dependency: `pip install -e '.[plot]'`.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import ArgumentParser, UserError, run_main
from forge.io import atomic_write, os_reason
from forge.metrics import CONFIG_NAME, read_metrics


@dataclass
class Run:
    """The series of one run, each a list of (iteration, value) pairs sorted by iteration."""

    label: str
    tokens_per_iter: int | None
    loss: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)  # from eval steps (eval_iters batches)
    val_loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    tokens_per_sec: list = field(default_factory=list)
    mfu: list = field(default_factory=list)  # percent of the device's peak
    hellaswag: list = field(default_factory=list)  # acc_norm, when trained with eval_hellaswag_interval


def _series(records: list[dict], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    """(iter, value) for every record carrying a finite number under `key`; the last record wins per iter."""
    by_iter = {}
    for rec in records:
        value, it = rec.get(key), rec.get("iter")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(it, int):
            if value == value and abs(value) != float("inf"):  # NaN/inf would wreck the axis limits
                by_iter[it] = value * scale
    return sorted(by_iter.items())


def tokens_per_iter_from_config(run_dir: Path) -> int | None:
    """Global tokens per optimizer step from the run's train_config.json (config.json in runs made before
    it was renamed: only when it has train.py's layout, never a Hugging Face config), or None when unknown."""
    try:
        if (run_dir / CONFIG_NAME).is_file():
            config = json.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        else:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        config = config["config"]  # train.py writes {"git_commit": ..., "config": {...}}
        value = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def load_run(run_dir: str | Path, label: str) -> Run:
    """Read one run folder; a missing folder, missing or empty metrics.jsonl is a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the out_dir of a training run")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; train with this out_dir first (train.py writes metrics.jsonl on rank 0)")
    records = read_metrics(path)
    run = Run(
        label=label,
        tokens_per_iter=tokens_per_iter_from_config(run_dir),
        loss=_series(records, "loss"),
        train_loss=_series(records, "train_loss"),
        val_loss=_series(records, "val_loss"),
        lr=_series(records, "lr"),
        tokens_per_sec=_series(records, "tokens_per_sec"),
        mfu=_series(records, "mfu", scale=100.0),
        hellaswag=_series(records, "hellaswag_acc_norm"),
    )
    if not (run.loss or run.val_loss):
        raise UserError(f"{path} has no loss records yet; plot again after the first log_interval")
    return run


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt, matplotlib.ticker


def plot_runs(runs: list[Run], out_path: str | Path, x_axis: str = "iter") -> Path:
    """Draw loss, lr, tokens/s and MFU (and HellaSwag acc_norm when logged) of every run, overlaid, into one PNG.

    x_axis='iter' puts iterations on the x axis, with a 'tokens seen' axis on top when every run
    has the same known tokens per iteration; x_axis='tokens' plots against tokens seen directly
    (needs train_config.json in every run), which compares runs with different batch sizes fairly.
    """
    plt, ticker = _import_pyplot()
    EngFormatter, FuncFormatter = ticker.EngFormatter, ticker.FuncFormatter
    if x_axis == "tokens":
        missing = [run.label for run in runs if run.tokens_per_iter is None]
        if missing:
            raise UserError(f"--x=tokens needs train_config.json (batch_size, block_size, gradient_accumulation_steps) in: {', '.join(missing)}")

    def xs(run, series):
        scale = run.tokens_per_iter if x_axis == "tokens" else 1
        return [it * scale for it, _ in series], [v for _, v in series]

    with_hellaswag = any(run.hellaswag for run in runs)
    fig, axes = plt.subplots(2, 3 if with_hellaswag else 2, figsize=(19 if with_hellaswag else 13, 8.5),
                             constrained_layout=True)
    if with_hellaswag:
        ax_loss, ax_lr, ax_hs, ax_tps, ax_mfu, ax_unused = axes.flat
        ax_unused.remove()
    else:
        ax_loss, ax_lr, ax_tps, ax_mfu = axes.flat
        ax_hs = None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        if run.loss:
            ax_loss.plot(*xs(run, run.loss), color=colour, alpha=0.35, linewidth=0.9, label=f"{run.label} train (log steps)")
        if run.train_loss:
            ax_loss.plot(*xs(run, run.train_loss), color=colour, linestyle="--", marker=".", label=f"{run.label} train (eval)")
        if run.val_loss:
            best = min(v for _, v in run.val_loss)
            ax_loss.plot(*xs(run, run.val_loss), color=colour, marker="o", markersize=3, linewidth=1.8, label=f"{run.label} val (best {best:.4f})")
        for ax, series in ((ax_lr, run.lr), (ax_tps, run.tokens_per_sec), (ax_mfu, run.mfu), (ax_hs, run.hellaswag)):
            if series and ax is not None:
                ax.plot(*xs(run, series), color=colour, linewidth=1.2, label=run.label)

    x_label = "tokens seen" if x_axis == "tokens" else "iteration"
    titles = ((ax_loss, "loss", "cross-entropy loss"), (ax_lr, "learning rate", "lr"),
              (ax_tps, "throughput", "tokens/s"), (ax_mfu, "model FLOPs utilisation", "MFU (% of peak)"))
    if ax_hs is not None:
        titles += ((ax_hs, "HellaSwag (completion style)", "acc_norm"),)
    for ax, title, y_label in titles:
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            note = "MFU unknown: peak FLOPs of this device not in the table\n(train with --peak_flops=... to set it)" if ax is ax_mfu else "no data"
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}"))  # no offset text under the top axis
    if x_axis == "tokens":
        for ax, _, _ in titles:
            ax.xaxis.set_major_formatter(EngFormatter())

    shared_tpi = {run.tokens_per_iter for run in runs}
    if x_axis == "iter" and len(shared_tpi) == 1 and None not in shared_tpi:
        tpi = shared_tpi.pop()
        for ax in [ax for ax in fig.axes if ax.get_lines()]:
            top = ax.secondary_xaxis("top", functions=(lambda it: it * tpi, lambda tok: tok / tpi))
            top.xaxis.set_major_formatter(EngFormatter())  # 1.2M, 40k: readable token counts
            top.set_xlabel(f"tokens seen ({tpi:,} per iteration)", fontsize=8)
    fig.suptitle(" vs ".join(run.label for run in runs))

    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise UserError(f"cannot write {out_path}: folder {out_path.parent} does not exist")
    try:  # atomic: a reader never sees half a PNG
        atomic_write(out_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {os_reason(exc)}") from None
    finally:
        plt.close(fig)
    return out_path


def main(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="python -m forge.plot", description="Plot loss, lr, tokens/s and MFU of one or more runs from their metrics.jsonl."
    )
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="training run folders (out_dir) to draw, overlaid")
    parser.add_argument("--out", help="PNG to write (default: OUT_DIR/metrics.png for one run, compare.png here for several)")
    parser.add_argument("--labels", help="comma-separated legend names, one per OUT_DIR (default: folder names)")
    parser.add_argument("--x", choices=("iter", "tokens"), default="iter", help="x axis: iterations (default) or tokens seen")
    args = parser.parse_args(argv)

    names = [Path(d).resolve().name for d in args.out_dirs]
    # folder names, or the paths as given when two runs share a name (run1/out vs run2/out)
    labels = names if len(set(names)) == len(names) else list(args.out_dirs)
    if args.labels is not None:
        labels = args.labels.split(",")
        if len(labels) != len(args.out_dirs):
            raise UserError(f"--labels has {len(labels)} names for {len(args.out_dirs)} run folders; give one per folder")
    runs = [load_run(d, label) for d, label in zip(args.out_dirs, labels)]
    out = args.out or (Path(args.out_dirs[0]) / "metrics.png" if len(runs) == 1 else Path("compare.png"))
    path = plot_runs(runs, out, x_axis=args.x)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
