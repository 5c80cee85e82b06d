"""Observability: metrics, traces, audit records and logs, kept at the side of the core."""
