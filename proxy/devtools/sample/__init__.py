"""The sample ISP / telecom database the seed-derived policy is written for: schema.sql, fake data and the policies' location."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA_SQL = HERE / "schema.sql"


def policies_dir() -> Path:
    """The shipped policy directory: packaged with the code, or the checkout's ``policies/``.

    ``proxy/devtools/sample/policies`` links to the checkout's ``policies/``; a wheel
    holds a copy of it, so the policies are found in an installed package too.
    """
    for candidate in (HERE / "policies", HERE.parents[2] / "policies"):
        if (candidate / "policy.csv").is_file():
            return candidate
    raise FileNotFoundError("the shipped policies were not found (looked in "
                            f"{HERE / 'policies'} and {HERE.parents[2] / 'policies'})")
