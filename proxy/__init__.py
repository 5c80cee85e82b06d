"""purpose-proxy: a wire-level PostgreSQL proxy that enforces purpose limitation."""

__version__ = "0.1.0"
