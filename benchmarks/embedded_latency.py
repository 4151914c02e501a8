"""Cold start, warm execute and kill latency of `fleetvm serve`, end to end.

Starts `fleetvm serve` on a free port of 127.0.0.1 with a temporary data
directory, drives it over HTTP, prints median and p99 of each figure over
several runs, and stops it.

    .venv/bin/python -m benchmarks.embedded_latency [--sessions 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from tests.harness import Server


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(client: httpx.Client, path: str, body: dict) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(path, json=body)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000, response


def run_once(client: httpx.Client, sessions: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"cold start": [], "warm execute": [], "kill": []}
    for _ in range(sessions):
        started = time.perf_counter()
        session_id = client.post("/v1/sessions/session", json={}).json()["session_id"]
        body = {"session_id": session_id, "command": "print(1)"}
        client.post("/execute", json=body).raise_for_status()
        figures["cold start"].append((time.perf_counter() - started) * 1000)
        for _ in range(5):
            elapsed, _ = timed(client, "/execute", body)
            figures["warm execute"].append(elapsed)
        elapsed, response = timed(client, "/kill", {"session_id": session_id})
        if response.json()["outcome"] != "killed":
            raise RuntimeError(f"unexpected kill response {response.json()}")
        figures["kill"].append(elapsed)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    server = Server().start()
    try:
        with server.client(server.admin_key) as client:
            run_once(client, 3)  # warm-up
            runs = [run_once(client, args.sessions) for _ in range(args.repeats)]
    finally:
        server.cleanup()

    for name in runs[0]:
        medians = [statistics.median(run[name]) for run in runs]
        p99s = [percentile(run[name], 0.99) for run in runs]
        print(
            f"{name:13s} p50 {statistics.median(medians):7.1f} ms "
            f"(runs {min(medians):.1f}-{max(medians):.1f})  "
            f"p99 {statistics.median(p99s):7.1f} ms  "
            f"({args.repeats} runs x {len(runs[0][name])} samples)"
        )


if __name__ == "__main__":
    main()
