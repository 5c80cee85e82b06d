"""Reading the settings a client passes at connect time, as PostgreSQL reads them.

A StartupMessage carries settings two ways (55.7, "StartupMessage"): as their own
parameters (``pii.purpose=billing``) and inside ``options`` as command-line
switches (``-c pii.purpose=billing`` or ``--pii.purpose=billing``), split on
white space with backslash escaping a following character (pg_split_opts in
src/backend/utils/init/postinit.c). Later ones win, and ``options`` is applied
after the plain parameters, as in process_startup_options.
"""

from __future__ import annotations


def split_options(options: str) -> list[str]:
    r"""Split an ``options`` string the way pg_split_opts does.

    >>> split_options(r"-c a=b  -c x=with\ space")
    ['-c', 'a=b', '-c', 'x=with space']
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
        elif ch.isspace():
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


def startup_settings(params: dict[str, str]) -> dict[str, str]:
    """All settings of a StartupMessage, names lower-cased, ``options`` applied last.

    >>> startup_settings({"user": "app", "pii.purpose": "a", "options": "-c pii.purpose=b --search_path=crm"})
    {'pii.purpose': 'b', 'search_path': 'crm'}
    """
    reserved = {"user", "database", "options", "replication"}
    settings = {k.lower(): v for k, v in params.items() if k.lower() not in reserved and not k.startswith("_pq_.")}
    args = split_options(params.get("options", ""))
    i = 0
    while i < len(args):
        arg = args[i]
        item = None
        if arg == "-c" and i + 1 < len(args):
            item = args[i + 1]
            i += 1
        elif arg.startswith("-c") and len(arg) > 2:
            item = arg[2:]
        elif arg.startswith("--"):
            item = arg[2:]
        i += 1
        if item and "=" in item:
            name, _, value = item.partition("=")
            # PostgreSQL treats dashes in option names as underscores (ParseLongOption).
            settings[name.replace("-", "_").lower()] = value
    return settings
