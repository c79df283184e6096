"""``distrib report A.csv [B.csv ...] -o OUT.png``: compare runs from their metrics CSVs.

One line per file (the mean over ranks at each step), labelled by the file's name, in three
panels: loss, step time and bytes sent per step. matplotlib is imported only here.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict

from launcher.errors import LaunchError

PANELS = (("loss", "loss"), ("step_time_s", "step time (s)"), ("bytes_sent", "bytes sent per step"))


def step_means(path: str) -> dict[str, tuple[list[int], list[float]]]:
    """For each plotted column: (steps, mean over ranks at that step), skipping empty cells."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "step" not in reader.fieldnames:
                raise LaunchError(f"{path} is not a distrib metrics CSV (no 'step' column)")
            rows = list(reader)
    except OSError as e:
        raise LaunchError(f"cannot read {path}: {e.strerror}") from None
    series = {}
    for column, _ in PANELS:
        sums = defaultdict(lambda: [0.0, 0])
        for row in rows:
            value = row.get(column) or ""
            try:
                step, number = int(row["step"]), float(value)
            except ValueError:
                continue  # empty cell: not reported at that step
            sums[step][0] += number
            sums[step][1] += 1
        steps = sorted(sums)
        series[column] = (steps, [sums[s][0] / sums[s][1] for s in steps])
    return series


def plot(paths: list[str], out: str) -> None:
    """Draw the runs of ``paths`` into the image ``out`` (format from its extension)."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):  # same file name in several folders: show the paths
        names = list(paths)
    runs = [(name, step_means(p)) for name, p in zip(names, paths)]  # bad input fails before the slow import
    try:
        import matplotlib
    except ImportError:
        raise LaunchError("distrib report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 3 * len(PANELS)), sharex=True)
    for ax, (column, title) in zip(axes, PANELS):
        drawn = 0
        for label, series in runs:
            steps, values = series[column]
            if steps:
                ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
                drawn += 1
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {column} recorded", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        fig.savefig(out)
    except (OSError, ValueError) as e:
        raise LaunchError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(fig)
