"""Logging set-up for fleetvm processes: one line per event on stderr.

Lines about a VM carry its ids as ``key=value`` pairs after the message, taken
from the ``extra=`` of the logging call, so a grep for a VM id finds them all.
"""

from __future__ import annotations

import logging
import sys

CONTEXT_FIELDS = ("session_id", "vm_id", "worker_id", "task_id")


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [
            f"{name}={value}"
            for name in CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        if not pairs:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(pairs)}]{newline}{rest}"


def configure_logging(level: str = "INFO") -> None:
    """Send every log record of this process to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        ContextFormatter(
            "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Celery logs every task's return value at INFO, which would copy users'
    # program output and files into the log; failures still log at ERROR.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
