"""Business logic behind the API routes; nothing here speaks HTTP."""
