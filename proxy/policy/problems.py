"""Problems found in policy files, and ``PolicyError``, the exception that carries them.

A problem names the file, the line (when known) and what is wrong, so a security
team can fix a policy without reading the loader's source.
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a policy: ``file:line: message``.

    >>> str(Problem("policy.csv", 7, "unknown effect 'alow'"))
    "policy.csv:7: unknown effect 'alow'"
    >>> str(Problem("purposes.yaml", None, "purpose 'x' cannot be declared", WARNING))
    "purposes.yaml: warning: purpose 'x' cannot be declared"
    """

    file: str
    line: int | None
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        level = "" if self.severity == ERROR else f"{self.severity}: "
        return f"{where}: {level}{self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "severity": self.severity, "message": self.message}


class PolicyError(ValueError):
    """The policy cannot be loaded; ``problems`` lists every error found, in file order.

    >>> err = PolicyError([Problem("catalog.yaml", 3, "unknown category 'contct'")])
    >>> str(err)
    "catalog.yaml:3: unknown category 'contct'"
    >>> err.problems[0].line
    3
    """

    def __init__(self, problems: "list[Problem] | tuple[Problem, ...]") -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid policy")

    @classmethod
    def one(cls, file: str, line: int | None, message: str) -> "PolicyError":
        return cls([Problem(file, line, message)])


class Collector:
    """Accumulates problems while a file is parsed, so all of them are reported at once."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def error(self, line: int | None, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise PolicyError(self.problems)
