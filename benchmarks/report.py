"""Tables and plots of a benchmark result file.

    .venv/bin/python -m benchmarks.report benchmarks/results/<date>.json

Prints the Markdown tables that docs/benchmarks.md shows, and writes two PNG
plots beside the result file.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

#: The ratios the project aims for; reported, never asserted.
KILL_P50_GOAL = 2.0
KILL_P99_GOAL = 4.0
WARM_P50_GOAL = 2.0
COLD_P50_GOAL = 2.0
EXPIRY_P99_GOAL_MS = 100.0
THROUGHPUT_GOAL = 0.7
SCALING_GOAL = 1.2
LATENCIES = ("cold start", "warm execute", "kill")


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile: the smallest value with at least
    ``fraction`` of the values at or below it."""
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def summarize(series: dict) -> dict[str, float]:
    """p50 (median of the runs' medians), p99 and max of all samples, run spread."""
    runs = [run for run in series["runs"] if run]
    pooled = [value for run in runs for value in run]
    medians = [statistics.median(run) for run in runs]
    return {
        "p50": statistics.median(medians)
        if len(runs) > 1
        else statistics.median(pooled),
        "p99": percentile(pooled, 0.99),
        "max": max(pooled),
        "low": min(medians) if len(runs) > 1 else min(pooled),
        "high": max(medians) if len(runs) > 1 else max(pooled),
        "samples": len(pooled),
    }


class Index:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.series = data["series"]

    def find(
        self, figure: str, mode: str = "floor", fleet: int | None = None, **extra
    ) -> dict | None:
        matches = [
            s
            for s in self.series
            if s["figure"] == figure
            and s["mode"] == mode
            and (fleet is None or s["fleet"] == fleet)
            and all(s.get(key) == value for key, value in extra.items())
        ]
        return matches[0] if matches else None

    def stat(self, figure: str, mode: str = "floor", fleet: int | None = None, **extra):
        found = self.find(figure, mode, fleet, **extra)
        return summarize(found) if found else None

    def fleets(self) -> list[int]:
        return sorted(
            {
                s["fleet"]
                for s in self.series
                if s["mode"] == "cluster" and s["fleet"] is not None
            }
        )

    def stored_levels(self, fleet: int) -> list[int]:
        return sorted(
            {
                s["stored"]
                for s in self.series
                if s["mode"] == "cluster"
                and s["fleet"] == fleet
                and s["figure"] == "kill"
            }
        )


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def latency_floors(index: Index) -> dict[str, float]:
    """Return the p50 floor of each latency figure, summed from its parts."""
    api = index.stat("API request")["p50"]
    trip = index.stat("Celery round trip")["p50"]
    return {
        "kill": api + trip + index.stat("bare sandbox kill")["p50"],
        "warm execute": api + trip,
        "cold start": api + trip + index.stat("bare sandbox start")["p50"],
    }


def goals_table(index: Index) -> list[str]:
    smallest, largest = index.fleets()[0], index.fleets()[-1]
    stored = index.stored_levels(smallest)[0]
    api = index.stat("API request")["p50"]
    trip = index.stat("Celery round trip")["p50"]
    bare_kill = index.stat("bare sandbox kill")["p50"]
    bare_start = index.stat("bare sandbox start")["p50"]
    floors = latency_floors(index)

    lines = [
        "| Figure (cluster, "
        f"{smallest} VMs) | p50 ms | p99 ms | max ms | samples | floor ms "
        "| p50 / floor | p99 / floor | Goal | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    goals = {
        "kill": (KILL_P50_GOAL, KILL_P99_GOAL),
        "warm execute": (WARM_P50_GOAL, None),
        "cold start": (COLD_P50_GOAL, None),
    }
    for figure in ("kill", "warm execute", "cold start"):
        summary = index.stat(figure, "cluster", smallest, stored=stored)
        floor = floors[figure]
        p50_goal, p99_goal = goals[figure]
        ok = summary["p50"] <= p50_goal * floor
        goal = f"p50 ≤ {p50_goal:g}x"
        if p99_goal:
            ok = ok and summary["p99"] <= p99_goal * floor
            goal += f", p99 ≤ {p99_goal:g}x"
        lines.append(
            f"| {figure} | {_ms(summary['p50'])} | {_ms(summary['p99'])} "
            f"| {_ms(summary['max'])} | {summary['samples']} | {_ms(floor)} "
            f"| {summary['p50'] / floor:.1f}x "
            f"| {summary['p99'] / floor:.1f}x | {goal} | {_verdict(ok)} |"
        )

    lateness = index.stat("expiry lateness", "cluster", largest)
    lines.append(
        f"| expiry lateness, {largest} VMs | {_ms(lateness['p50'])} "
        f"| {_ms(lateness['p99'])} | {_ms(lateness['max'])} "
        f"| {lateness['samples']} | | | "
        f"| p99 < {EXPIRY_P99_GOAL_MS:g} ms "
        f"| {_verdict(lateness['p99'] < EXPIRY_P99_GOAL_MS)} |"
    )
    kills = index.stat("kill throughput", "cluster", smallest)["p50"]
    tasks = index.stat("Celery throughput")["p50"]
    lines.append(
        f"| kill throughput | {kills:.0f}/s | | | | {tasks:.0f} tasks/s "
        f"| {kills / tasks:.2f}x | | ≥ {THROUGHPUT_GOAL:g}x "
        f"| {_verdict(kills / tasks >= THROUGHPUT_GOAL)} |"
    )
    health = index.stat("API request", "cluster")
    floor_text = (
        f"Floors (p50): one request to a bare FastAPI app {_ms(api)} ms, Celery "
        f"round trip {_ms(trip)} ms, bare sandbox kill {bare_kill:.2f} ms, bare "
        f"sandbox start {_ms(bare_start)} ms. For comparison, fleetvm's "
        f"GET /health, which reads the database: {_ms(health['p50'])} ms."
    )
    return [*lines, "", floor_text]


def scaling_table(index: Index) -> list[str]:
    fleets = index.fleets()
    smallest, largest = fleets[0], fleets[-1]
    header = " | ".join(f"{fleet} VMs" for fleet in fleets)
    lines = [
        f"| Figure (p50 / p99 ms) | {header} | {largest} / {smallest} (p50) | |",
        "|---|" + "---:|" * len(fleets) + "---:|---|",
    ]

    for figure in (*LATENCIES, "expiry lateness"):
        cells, stats = [], []
        for fleet in fleets:
            summary = index.stat(figure, "cluster", fleet)
            stats.append(summary)
            cells.append(f"{_ms(summary['p50'])} / {_ms(summary['p99'])}")
        ratio = stats[-1]["p50"] / stats[0]["p50"]
        lines.append(
            f"| {figure} | {' | '.join(cells)} | {ratio:.2f}x "
            f"| {_verdict(ratio <= SCALING_GOAL)} |"
        )

    cells, rates = [], []
    for fleet in fleets:
        rate = index.stat("kill throughput", "cluster", fleet)["p50"]
        rates.append(rate)
        cells.append(f"{rate:.0f}/s")
    # Throughput is worse when it falls, so its ratio is the rate at 10 VMs
    # over the rate at the largest fleet.
    ratio = rates[0] / rates[-1]
    lines.append(
        f"| kill throughput (10 / {largest}) | {' | '.join(cells)} | {ratio:.2f}x "
        f"| {_verdict(ratio <= SCALING_GOAL)} |"
    )
    return lines


def stored_table(index: Index) -> list[str]:
    smallest = index.fleets()[0]
    levels = index.stored_levels(smallest)
    header = " | ".join(f"{level:,} sessions" for level in levels)
    lines = [
        f"| Figure (p50 / p99 ms, {smallest} VMs) | {header} |",
        "|---|" + "---:|" * len(levels),
    ]
    for figure in LATENCIES:
        cells = []
        for level in levels:
            summary = index.stat(figure, "cluster", smallest, stored=level)
            cells.append(f"{_ms(summary['p50'])} / {_ms(summary['p99'])}")
        lines.append(f"| {figure} | {' | '.join(cells)} |")
    return lines


def modes_table(index: Index) -> list[str]:
    smallest = index.fleets()[0]
    stored = index.stored_levels(smallest)[0]
    lines = [
        "| Figure (p50 / p99 ms) | cluster | embedded | Jupyter Server "
        "| cluster / Jupyter (p50) |",
        "|---|---:|---:|---:|---:|",
    ]
    for figure in LATENCIES:
        cluster = index.stat(figure, "cluster", smallest, stored=stored)
        embedded = index.stat(figure, "embedded")
        peer = index.stat(figure, "jupyter")
        cells = [
            f"{_ms(s['p50'])} / {_ms(s['p99'])}" if s else "n/a"
            for s in (cluster, embedded, peer)
        ]
        ratio = f"{cluster['p50'] / peer['p50']:.2f}x" if peer else "n/a"
        lines.append(f"| {figure} | {' | '.join(cells)} | {ratio} |")
    return lines


def memory_table(index: Index) -> list[str]:
    fleets = index.fleets()
    header = " | ".join(f"{fleet} VMs" for fleet in fleets)
    lines = [f"| Memory (MiB) | {header} |", "|---|" + "---:|" * len(fleets)]
    for figure in (
        "memory per idle VM (Pss)",
        "memory per idle VM (private)",
        "memory per worker (Pss)",
    ):
        cells = []
        for fleet in fleets:
            summary = index.stat(figure, "cluster", fleet)
            cells.append(f"{summary['p50']:.1f}" if summary else "n/a")
        lines.append(f"| {figure} | {' | '.join(cells)} |")
    return lines


def plot(index: Index, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    smallest = index.fleets()[0]
    stored = index.stored_levels(smallest)[0]
    floors = latency_floors(index)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, name in zip(axes, LATENCIES, strict=True):
        sources = [
            (
                f"cluster, {smallest} VMs",
                index.find(name, "cluster", smallest, stored=stored),
            ),
            (f"embedded, {smallest} VMs", index.find(name, "embedded")),
            ("Jupyter Server", index.find(name, "jupyter")),
        ]
        for label, series in sources:
            if series is None:
                continue
            values = sorted(v for run in series["runs"] for v in run)
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            axis.step(values, fractions, where="post", label=label)
        axis.axvline(floors[name], color="grey", linestyle="--", label="floor (p50)")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("ms (log scale)")
        axis.set_ylabel("fraction of samples")
        axis.set_title(name)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    distributions = out_dir / f"{stem}-distributions.png"
    figure.savefig(distributions, dpi=100)
    plt.close(figure)

    fleets = index.fleets()
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for axis, name in zip(axes, (*LATENCIES, "expiry lateness"), strict=True):
        stats = [index.stat(name, "cluster", fleet) for fleet in fleets]
        axis.plot(fleets, [s["p50"] for s in stats], marker="o", label="p50")
        axis.plot(fleets, [s["p99"] for s in stats], marker="s", label="p99")
        axis.set_xscale("log")
        axis.set_xticks(fleets, [str(fleet) for fleet in fleets])
        axis.set_ylim(bottom=0)
        axis.set_xlabel("live VMs")
        axis.set_ylabel("ms")
        axis.set_title(name)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    scaling = out_dir / f"{stem}-fleet-size.png"
    figure.savefig(scaling, dpi=100)
    plt.close(figure)
    return [distributions, scaling]


def render(data: dict, out_dir: Path, stem: str | None = None) -> str:
    """Return the Markdown report of a result file and write its plots."""
    index = Index(data)
    stem = stem or data["meta"]["date"][:16].replace(":", "")
    meta = data["meta"]
    machine = meta["machine"]
    images = plot(index, out_dir, stem)
    sections = [
        f"Run {meta['date']} on commit {meta['commit']}, {machine['cores']} cores "
        f"({machine['cpu']}), {machine['memory_gib']} GiB, Linux "
        f"{machine['kernel']}, Python {machine['python']}; "
        f"{meta['repeats']} runs of {meta['cycles']} VMs each, "
        f"{meta.get('duration_seconds', '?')} s in all.",
        "",
        "### Goals",
        "",
        *goals_table(index),
        "",
        "### Against fleet size",
        "",
        *scaling_table(index),
        "",
        "### Against stored sessions",
        "",
        *stored_table(index),
        "",
        "### Cluster, embedded and Jupyter Server",
        "",
        *modes_table(index),
        "",
        "### Memory",
        "",
        *memory_table(index),
        "",
        *[f"![{image.stem}]({image.name})" for image in images],
    ]
    return "\n".join(sections)


def main() -> None:
    path = Path(sys.argv[1])
    print(render(json.loads(path.read_text()), path.parent, path.stem))


if __name__ == "__main__":
    main()
