"""The HTTP API: FastAPI routes, authentication and error mapping."""
