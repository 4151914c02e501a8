"""A bare FastAPI app on uvicorn, the floor of one API request.

python -m uvicorn benchmarks.api_floor:app --host 127.0.0.1 --port PORT
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
def read_health() -> dict[str, str]:
    """Return a constant, so a request measures only HTTP, FastAPI and uvicorn."""
    return {"status": "ok"}
