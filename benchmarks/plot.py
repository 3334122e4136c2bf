"""A PNG bar chart of the ratios of one run: each of our rows against the peer of its table,
with the goal drawn where the row has one. matplotlib is a benchmark-only extra."""

from __future__ import annotations

from typing import Any


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'aufs[bench]'") from None


def plot_ratios(tables: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels: list[str] = []
    ratios: list[float] = []
    goals: list[float | None] = []
    for table in tables:
        if table["kind"] != "time":
            continue
        peer = next((row["name"] for row in table["rows"] if row["peer"]), "peer")
        for row in table["rows"]:
            if row["peer"]:
                continue
            what = table["title"].split(" (")[0]
            labels.append(f"{what}\n{row['name']} vs {peer.removesuffix(' (peer)')}")
            ratios.append(row["ratio"])
            goals.append(row["goal"])
    figure, axes = plt.subplots(figsize=(10, 0.55 * len(labels) + 1.2))
    positions = list(range(len(labels)))[::-1]
    colours = ["#2a7" if goal is None or ratio <= goal else "#d64"
               for ratio, goal in zip(ratios, goals, strict=True)]
    axes.barh(positions, ratios, color=colours, height=0.6)
    for position, ratio, goal in zip(positions, ratios, goals, strict=True):
        axes.text(ratio, position, f" {ratio:.2f}x", va="center", fontsize=8)
        if goal is not None:
            axes.plot([goal, goal], [position - 0.35, position + 0.35], color="black",
                      linewidth=2)
    axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xscale("log")  # 0.03x and 100x side by side
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    axes.set_yticks(positions, labels, fontsize=7)
    axes.set_xlabel("time, ours / peer (log scale, lower is better; black tick: the goal, "
                    "red: goal missed)")
    axes.set_title("aufs benchmarks: ratios to the peer measured in the same run")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
