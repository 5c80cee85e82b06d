"""Reading the settings a client passes at connect time, as PostgreSQL reads them.

A StartupMessage carries settings two ways (55.7, "StartupMessage"): as their own
parameters (``pii.purpose=billing``) and inside ``options`` as command-line
switches (``-c pii.purpose=billing`` or ``--pii.purpose=billing``), split on
white space with backslash escaping a following character (pg_split_opts in
src/backend/utils/init/postinit.c). ``options`` is applied first and the
parameters of their own after it, so those win (process_startup_options); within
each, later ones win. ``options`` holding anything but settings refuses the
connection (``option_settings``).
"""

from __future__ import annotations


# isspace() of C on the bytes, as pg_split_opts calls it. Python's str.isspace() also takes
# U+001C..U+001F, U+0085, U+00A0, U+3000, ... for spaces, where PostgreSQL goes on with the word:
# "--search_path=member,<U+001C>--search_path=public" was one setting to PostgreSQL and two to the
# proxy. Other characters that some locale could take for a space are refused (``option_settings``).
_C_SPACE = " \t\n\v\f\r"


def split_options(options: str) -> list[str]:
    r"""Split an ``options`` string the way pg_split_opts does.

    >>> split_options(r"-c a=b  -c x=with\ space")
    ['-c', 'a=b', '-c', 'x=with space']
    >>> split_options("-c a=b\x1c-c x=y")
    ['-c', 'a=b\x1c-c', 'x=y']
    """
    out: list[str] = []
    cur: list[str] = []
    escaped = False
    in_word = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
            in_word = True
        elif ch in _C_SPACE:
            if in_word:
                out.append("".join(cur))
                cur = []
                in_word = False
        else:
            cur.append(ch)
            in_word = True
    if in_word:
        out.append("".join(cur))
    return out


class BadOptions(ValueError):
    """The ``options`` of a StartupMessage hold something other than settings the proxy reads as PostgreSQL does."""


def option_settings(options: str) -> list[tuple[str, str]]:
    """The settings an ``options`` string makes, in order, or ``BadOptions``.

    PostgreSQL reads ``options`` with getopt over its whole set of server switches
    (process_postgres_switches in src/backend/tcop/postgres.c), where ``-Ec x=y`` is
    two bundled switches and ``-r -c --x=y`` sets ``x`` (``-r`` takes ``-c`` as its
    argument). Rather than mimic all of getopt, only ``-c name=value``,
    ``-cname=value`` and ``--name=value`` are read; anything else refuses the
    connection, so the two readings cannot differ. Dashes in names are underscores
    (ParseLongOption).

    >>> option_settings(r"-c pii.purpose=b -csearch_path=crm --work-mem=4MB")
    [('pii.purpose', 'b'), ('search_path', 'crm'), ('work_mem', '4MB')]
    >>> option_settings("-Ec search_path=crm")
    Traceback (most recent call last):
    ...
    proxy.enforcement.startup.BadOptions: startup options: word 1 is neither -c name=value nor --name=value, the only forms purpose-proxy reads
    """
    odd = next((ch for ch in options
                if ch not in _C_SPACE and (ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0xA0)), None)
    if odd is not None:  # a space to Python, or to isspace() in some server locale, but not in C's
        raise BadOptions(f"startup options: purpose-proxy refuses the character U+{ord(odd):04X} in options")
    args = split_options(options)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c" and i + 1 < len(args):
            item = args[i + 1]
            i += 2
        elif arg.startswith("-c") and len(arg) > 2 or arg.startswith("--") and len(arg) > 2:
            item = arg[2:]
            i += 1
        else:
            # (The client's text is not repeated: the message goes to the audit log, which keeps no values.)
            raise BadOptions(f"startup options: word {i + 1} is neither -c name=value nor --name=value, "
                             "the only forms purpose-proxy reads")
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise BadOptions(f"startup options: setting {len(out) + 1} is not name=value")
        out.append((name.replace("-", "_").lower(), value))
    return out


def startup_settings(params: dict[str, str]) -> dict[str, str]:
    """All settings of a StartupMessage, names lower-cased: ``options`` first, then the parameters of their
    own, which win (process_startup_options in src/backend/utils/init/postinit.c). ``BadOptions`` when
    ``options`` holds anything but settings.

    >>> startup_settings({"user": "app", "pii.purpose": "a", "options": "-c pii.purpose=b --search_path=crm"})
    {'search_path': 'crm', 'pii.purpose': 'a'}
    """
    reserved = {"user", "database", "options", "replication"}
    settings = dict(option_settings(params.get("options", "")))
    for k, v in params.items():
        if k.lower() not in reserved and not k.startswith("_pq_."):
            settings.pop(k.lower(), None)  # re-inserted last: the order PostgreSQL applies them in
            settings[k.lower()] = v
    return settings
