"""Database layer: SQLAlchemy models, engine, and compare-and-set state changes."""
