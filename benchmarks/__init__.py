"""Benchmark harness: pgbench against PostgreSQL directly, through PgBouncer and through purpose-proxy."""
