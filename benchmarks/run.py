"""Run every fleetvm benchmark with its floors and peer, and write the results.

    make bench                       # everything, about 20 minutes on 2 cores
    .venv/bin/python -m benchmarks.run --quick   # fewer VMs and samples

Starts what it measures (a cluster of three workers and one API node on
PostgreSQL and Redis, `fleetvm serve`, bare Celery workers, Jupyter Server),
each on 127.0.0.1, and stops it afterwards. PostgreSQL and Redis must be
running. Writes benchmarks/results/<date>.json, then the report and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks import report
from benchmarks.fleet import (
    MIN_AVAILABLE_MIB,
    REDIS_URL,
    ClusterTarget,
    EmbeddedTarget,
    Target,
    memory_kib,
    vm_process_pids,
)
from benchmarks.floors import (
    ApiFloor,
    BareSandbox,
    CeleryFloor,
    api_request,
    run_concurrently,
)
from benchmarks.peers import jupyter

RESULTS_DIR = Path(__file__).parent / "results"
#: Client threads of the throughput figures.
THROUGHPUT_CLIENTS = 16


class Progress:
    """One status line on stderr: step, phase, count and time since start."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.step = 0
        self.started = time.monotonic()
        self.phase = ""
        self.done = 0
        self.total = 0
        self.tty = sys.stderr.isatty()

    def begin(self, phase: str, total: int = 0) -> None:
        if self.phase and self.tty:
            sys.stderr.write("\n")
        self.step += 1
        self.phase, self.done, self.total = phase, 0, total
        self._show(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        self._show()

    def _show(self, force: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        count = f" {self.done}/{self.total}" if self.total else ""
        line = (
            f"[{self.step:2d}/{self.steps}] {int(elapsed) // 60:3d}:"
            f"{int(elapsed) % 60:02d}  {self.phase}{count}"
        )
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
            sys.stderr.flush()
        elif force:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class Results:
    """Samples by figure, mode, fleet size and stored sessions."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta
        self.series: list[dict] = []

    def add(
        self,
        figure: str,
        runs: list[list[float]],
        unit: str = "ms",
        mode: str = "floor",
        fleet: int | None = None,
        stored: int | None = None,
    ) -> None:
        self.series.append(
            {
                "figure": figure,
                "mode": mode,
                "fleet": fleet,
                "stored": stored,
                "unit": unit,
                "runs": runs,
            }
        )

    def write(self, path: Path) -> None:
        path.write_text(
            json.dumps({"meta": self.meta, "series": self.series}, indent=1)
        )


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib_total = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": len(
            [
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("processor")
            ]
        ),
        "memory_gib": round(memory_kib_total / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": _version(["psql", "--version"]),
        "redis": _version(["redis-server", "--version"]),
    }


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "not found"


def git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def latency_runs(
    target: Target, repeats: int, cycles: int, progress: Progress
) -> dict[str, list[list[float]]]:
    """Run cycles of cold start, five warm executes and a kill, ``repeats`` times.

    Three untimed cycles warm up first. The VM of each cycle is new, so the
    fleet keeps its size.
    """
    for _ in range(3):
        _, session_id, vm_id = target.cold_start()
        target.warm_execute(session_id)
        target.kill(session_id, vm_id)
    figures: dict[str, list[list[float]]] = {
        "cold start": [],
        "warm execute": [],
        "kill": [],
    }
    for _ in range(repeats):
        run: dict[str, list[float]] = {name: [] for name in figures}
        for _ in range(cycles):
            elapsed, session_id, vm_id = target.cold_start()
            run["cold start"].append(elapsed)
            for _ in range(5):
                run["warm execute"].append(target.warm_execute(session_id))
            run["kill"].append(target.kill(session_id, vm_id))
            progress.advance()
        for name, samples in run.items():
            figures[name].append(samples)
    return figures


def record_latency(
    target: Target,
    args: argparse.Namespace,
    results: Results,
    progress: Progress,
    title: str,
    **labels: object,
) -> None:
    """Run latency_runs with a progress line and add its figures to results."""
    progress.begin(
        f"{title}: cold start, warm execute, kill", args.repeats * args.cycles
    )
    for name, runs in latency_runs(target, args.repeats, args.cycles, progress).items():
        results.add(name, runs, **labels)


def kill_throughput(target: Target, kills: int, progress: Progress) -> float:
    """Return kills per second with THROUGHPUT_CLIENTS clients on started VMs."""
    sessions = []
    for _ in range(kills):
        _, session_id, _ = target.cold_start()
        sessions.append(session_id)

    def kill(index: int) -> None:
        response = target.client().post("/kill", json={"session_id": sessions[index]})
        response.raise_for_status()
        if response.json()["outcome"] != "killed":
            raise RuntimeError(f"kill returned {response.json()}")

    rate = run_concurrently(
        THROUGHPUT_CLIENTS, kills, kill, lambda: target.client().get("/health")
    )
    progress.advance()
    return rate


def measure_memory(target: ClusterTarget, results: Results, fleet: int) -> None:
    vm_ids = target.live_vms()
    vms = len(vm_ids)
    vm_memory = memory_kib(vm_process_pids(vm_ids))
    results.add(
        "memory per idle VM (Pss)",
        [[vm_memory["pss"] / 1024 / vms]],
        unit="MiB",
        mode="cluster",
        fleet=fleet,
    )
    results.add(
        "memory per idle VM (private)",
        [[vm_memory["private"] / 1024 / vms]],
        unit="MiB",
        mode="cluster",
        fleet=fleet,
    )
    workers = [memory_kib([pid])["pss"] / 1024 for pid in target.worker_pids().values()]
    results.add(
        "memory per worker (Pss)", [workers], unit="MiB", mode="cluster", fleet=fleet
    )


def measure_floors(
    args: argparse.Namespace, results: Results, progress: Progress, log_dir: Path
) -> None:
    progress.begin("floor: bare sandbox start and kill", args.repeats)
    sandbox = BareSandbox()
    try:
        for _ in range(3):
            sandbox.kill(sandbox.start()[1])
        starts, kills = [], []
        for _ in range(args.repeats):
            run_starts, run_kills = [], []
            for _ in range(args.cycles * 2):
                elapsed, process = sandbox.start()
                run_starts.append(elapsed)
                run_kills.append(sandbox.kill(process))
            starts.append(run_starts)
            kills.append(run_kills)
            progress.advance()
    finally:
        sandbox.close()
    results.add("bare sandbox start", starts)
    results.add("bare sandbox kill", kills)

    progress.begin("floor: bare Celery round trip and throughput", args.repeats * 2)
    with CeleryFloor(REDIS_URL, workers=3, log_dir=log_dir) as floor:
        for queue in floor.queues:
            for _ in range(20):
                floor.round_trip(queue)
        trips = []
        for _ in range(args.repeats):
            trips.append(
                [floor.round_trip(random.choice(floor.queues)) for _ in range(300)]
            )
            progress.advance()
        rates = []
        for _ in range(args.repeats):
            rates.append(floor.throughput(THROUGHPUT_CLIENTS, args.throughput * 10))
            progress.advance()
    results.add("Celery round trip", trips)
    results.add("Celery throughput", [rates], unit="tasks/s")

    progress.begin("floor: one request to a bare FastAPI app", args.repeats)
    with ApiFloor(log_dir) as api:
        results.add("API request", api_requests(api.url, args, progress))


def api_requests(
    url: str, args: argparse.Namespace, progress: Progress
) -> list[list[float]]:
    """Time runs of 300 GET /health on one kept-alive connection, after 50 more."""
    with httpx.Client(base_url=url) as client:
        for _ in range(50):
            api_request(client)
        runs = []
        for _ in range(args.repeats):
            runs.append([api_request(client) for _ in range(300)])
            progress.advance()
    return runs


def measure_cluster(
    args: argparse.Namespace, results: Results, progress: Progress, log_dir: Path
) -> None:
    progress.begin("cluster: starting PostgreSQL database, 3 workers, 1 API")
    with ClusterTarget(log_dir) as target:
        progress.begin("fleetvm GET /health (one database read)", args.repeats)
        results.add(
            "API request", api_requests(target.url, args, progress), mode="cluster"
        )

        for requested in args.fleet:
            progress.begin(f"cluster: growing the fleet to {requested} VMs", requested)
            progress.done = len(target.fleet)
            fleet = target.grow_fleet(requested, progress.advance)
            if fleet < requested:
                print(
                    f"\nonly {fleet} of {requested} VMs started: the host has less "
                    f"than {MIN_AVAILABLE_MIB} MiB of memory left",
                    file=sys.stderr,
                )
            time.sleep(2)  # let the spawns' follow-up work settle
            measure_memory(target, results, fleet)
            stored = target.cluster.query("SELECT count(*) FROM sessions")[0][0]

            record_latency(
                target,
                args,
                results,
                progress,
                f"cluster, {fleet} VMs",
                mode="cluster",
                fleet=fleet,
                stored=stored,
            )

            progress.begin(f"cluster, {fleet} VMs: expiry lateness", args.repeats)
            lateness = []
            for _ in range(args.repeats):
                lateness.append(target.expiry_lateness(args.expiries))
                progress.advance()
            results.add("expiry lateness", lateness, mode="cluster", fleet=fleet)

            progress.begin(f"cluster, {fleet} VMs: kill throughput", args.repeats)
            rates = [
                kill_throughput(target, args.throughput, progress)
                for _ in range(args.repeats)
            ]
            results.add(
                "kill throughput", [rates], unit="kills/s", mode="cluster", fleet=fleet
            )

        smallest = args.fleet[0]
        progress.begin(f"cluster: shrinking the fleet to {smallest} VMs")
        target.shrink_fleet(smallest, progress.advance)
        for stored in args.stored:
            progress.begin(f"cluster: storing {stored} ended sessions")
            actual = target.store_sessions(stored)
            record_latency(
                target,
                args,
                results,
                progress,
                f"cluster, {smallest} VMs, {actual} stored sessions",
                mode="cluster",
                fleet=smallest,
                stored=actual,
            )


def measure_embedded(
    args: argparse.Namespace, results: Results, progress: Progress
) -> None:
    progress.begin("embedded: starting fleetvm serve and 10 idle VMs")
    with EmbeddedTarget() as target:
        fleet = args.fleet[0]
        target.grow_fleet(fleet, progress.advance)
        record_latency(
            target,
            args,
            results,
            progress,
            f"embedded, {fleet} VMs",
            mode="embedded",
            fleet=fleet,
        )


def measure_jupyter(
    args: argparse.Namespace, results: Results, progress: Progress
) -> None:
    # measure() reports its two warm-up cycles too.
    progress.begin("peer: Jupyter Server kernels", args.repeats * (args.cycles + 2))
    runs: dict[str, list[list[float]]] = {}
    for _ in range(args.repeats):
        for name, samples in jupyter.measure(
            args.cycles, progress=progress.advance
        ).items():
            runs.setdefault(name, []).append(samples)
    for name, samples in runs.items():
        results.add(name, samples, mode="jupyter")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few VMs and samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=100, help="VMs per latency run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.fleet, args.stored = [10, 100], [10_000]
        args.cycles, args.expiries, args.throughput = 10, 5, 20
    else:
        args.fleet, args.stored = [10, 100, 500, 1000], [10_000, 100_000]
        args.expiries, args.throughput = 10, 80
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The drivers used for measuring would log warnings into the progress line.
    logging.getLogger("fleetvm").setLevel(logging.ERROR)

    started = datetime.now(UTC)
    results = Results(
        {
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
            "commit": git_commit(),
            "machine": machine(),
            "repeats": args.repeats,
            "cycles": args.cycles,
            "throughput_clients": THROUGHPUT_CLIENTS,
        }
    )

    # Floors 3, cluster start and /health 2, 4 per fleet size, shrink 1, 2 per
    # stored size, embedded 2, Jupyter 1.
    steps = 9 + 4 * len(args.fleet) + 2 * len(args.stored)
    progress = Progress(steps)
    log_dir = Path(tempfile.mkdtemp(prefix="fvm-bench-logs-", dir="/tmp"))
    try:
        measure_floors(args, results, progress, log_dir)
        measure_cluster(args, results, progress, log_dir)
        measure_embedded(args, results, progress)
        measure_jupyter(args, results, progress)
    except BaseException:
        progress.close()
        partial = log_dir / "partial-results.json"
        results.write(partial)
        print(
            f"benchmark failed; the figures taken so far are in {partial}, and the "
            f"logs of its processes in {log_dir}",
            file=sys.stderr,
        )
        raise

    progress.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    results.meta["duration_seconds"] = round(
        (datetime.now(UTC) - started).total_seconds()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.strftime('%Y-%m-%dT%H%M')}.json"
    results.write(path)
    print(f"results: {path}")
    print(report.render(json.loads(path.read_text()), args.out))


if __name__ == "__main__":
    main()
