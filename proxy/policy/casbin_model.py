"""The Casbin side of the policy: the model.conf the engine requires, its validation, and building enforcers.

Casbin matches rules (with the role, purpose and category hierarchies as its
g, g2 and g3 role managers). Its effectors only know allow and deny, so every
matching rule counts as "applicable" (the policy has no ``eft`` field) and the
loader hands rules to Casbin in precedence order: with ``priority(p.eft) || deny``
the first applicable rule is the one ``enforce_ex`` returns, and its ``effect``
field is the decision; no applicable rule means deny.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import casbin

from proxy.policy.problems import PolicyError, Problem

FILE = "model.conf"

MODEL = """\
# purpose-proxy Casbin model (policies/README.md). The loader checks these definitions;
# the matcher may gain further && conditions but must keep g(r.sub, p.sub) and r.act == p.act.
[request_definition]
r = sub, purpose, category, act

[policy_definition]
# effect: allow | deny | mask | aggregate; option: mask method or k=N (aggregate).
# Deliberately no "eft" field: every matching rule is applicable to Casbin and the
# loader orders rules deny, aggregate, mask, allow (see policies/README.md).
p = sub, purpose, category, act, effect, option

[role_definition]
# g: role -> role group (policy.csv g lines)
# g2: purpose -> parent purpose (derived from purposes.yaml)
# g3: category -> parent category (derived from catalog.yaml)
g = _, _
g2 = _, _
g3 = _, _

[policy_effect]
# The first applicable rule (in the loader's precedence order) decides; none: deny.
e = priority(p.eft) || deny

[matchers]
m = g(r.sub, p.sub) && (p.purpose == "*" || g2(r.purpose, p.purpose)) \
&& (p.category == "*" || g3(r.category, p.category)) && r.act == p.act
"""

REQUEST_TOKENS = ["r_sub", "r_purpose", "r_category", "r_act"]
POLICY_TOKENS = ["p_sub", "p_purpose", "p_category", "p_act", "p_effect", "p_option"]
ROLE_DEFINITIONS = ("g", "g2", "g3")
EFFECT = "priority(p_eft) || deny"
# The loader only offers Casbin the rules of the request's role and action; that is
# sound only while these two conditions are top-level conjuncts of the matcher.
REQUIRED_CONJUNCTS = ("g(r_sub,p_sub)", "r_act==p_act")
# When these are top-level conjuncts too, a request no rule's purpose and category
# can cover needs no Casbin call: no rule can apply, so the answer is deny.
PURPOSE_CONJUNCT = '(p_purpose=="*"||g2(r_purpose,p_purpose))'
CATEGORY_CONJUNCT = '(p_category=="*"||g3(r_category,p_category))'


def _key_line(text: str, section: str, key: str) -> int | None:
    """Line number of ``key = ...`` inside ``[section]`` of a Casbin conf text.

    >>> _key_line(MODEL, "matchers", "m") > _key_line(MODEL, "policy_effect", "e")
    True
    """
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == section and re.match(rf"{re.escape(key)}\s*=", line):
            return number
    return None


def top_level_split(expr: str, op: str) -> list[str]:
    """Split ``expr`` on ``op`` outside parentheses and quotes.

    >>> top_level_split('a && (b || c) && d == "&&"', "&&")
    ['a ', ' (b || c) ', ' d == "&&"']
    """
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and expr.startswith(op, i):
            parts.append(expr[start:i])
            i += len(op)
            start = i
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def conjuncts(matcher: str) -> frozenset[str]:
    """The top-level ``&&`` conditions of a matcher, without blanks.

    >>> sorted(conjuncts('g(r_sub, p_sub) && (p_purpose == "*" || g2(r_purpose, p_purpose))'))
    ['(p_purpose=="*"||g2(r_purpose,p_purpose))', 'g(r_sub,p_sub)']
    """
    return frozenset(re.sub(r"\s+", "", c) for c in top_level_split(matcher, "&&"))


def matcher_problem(matcher: str) -> str | None:
    """Why a matcher cannot be used, or None.

    >>> matcher_problem("g(r_sub, p_sub) && r_act == p_act && g2(r_purpose, p_purpose)") is None
    True
    >>> matcher_problem("g(r_sub, p_sub) && r_act == p_act || true")
    'the matcher must not have a top-level ||'
    """
    if len(top_level_split(matcher, "||")) > 1:
        return "the matcher must not have a top-level ||"
    present = conjuncts(matcher)
    missing = [c for c in REQUIRED_CONJUNCTS if c not in present]
    if missing:
        pretty = " and ".join(m.replace("_", ".").replace(",", ", ").replace("==", " == ") for m in missing)
        return f"the matcher must contain {pretty} as top-level conditions (joined with &&)"
    return None


def load_model(text: str, file: str = FILE) -> casbin.Model:
    """Parse and validate model.conf text; problems raise ``PolicyError``.

    >>> load_model(MODEL)["r"]["r"].tokens
    ['r_sub', 'r_purpose', 'r_category', 'r_act']
    >>> load_model(MODEL.replace("r = sub, purpose, category, act", "r = sub, obj, act"))
    Traceback (most recent call last):
    ...
    proxy.policy.problems.PolicyError: model.conf:4: request_definition must be 'r = sub, purpose, category, act'
    """
    problems: list[Problem] = []

    def bad(section: str, key: str, message: str) -> None:
        problems.append(Problem(file, _key_line(text, section, key), message))

    model = casbin.Model()
    try:
        model.load_model_from_text(text)
    except Exception as exc:  # casbin raises RuntimeError with "line N"
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError([Problem(file, int(m.group(1)) if m else None, f"not a Casbin model: {exc}")]) from None
    sections = {"r": "request_definition", "p": "policy_definition", "e": "policy_effect", "m": "matchers",
                "g": "role_definition"}
    for sec, name in sections.items():
        if sec not in model.keys():
            problems.append(Problem(file, None, f"missing [{name}] section"))
    if problems:
        raise PolicyError(problems)
    for sec, expected in (("r", ["r"]), ("p", ["p"]), ("e", ["e"]), ("m", ["m"]), ("g", list(ROLE_DEFINITIONS))):
        keys = sorted(model[sec].keys())
        if keys != sorted(expected):
            problems.append(Problem(file, None, f"[{sections[sec]}] must define exactly {', '.join(expected)}; "
                                                f"found {', '.join(keys)}"))
    if model["r"].get("r") is not None and model["r"]["r"].tokens != REQUEST_TOKENS:
        bad("request_definition", "r", "request_definition must be 'r = sub, purpose, category, act'")
    if model["p"].get("p") is not None and model["p"]["p"].tokens != POLICY_TOKENS:
        bad("policy_definition", "p",
            "policy_definition must be 'p = sub, purpose, category, act, effect, option' (no eft field)")
    for key in ROLE_DEFINITIONS:
        ast = model["g"].get(key)
        if ast is not None and ast.value.replace(" ", "") != "_,_":
            bad("role_definition", key, f"{key} must be '_, _'")
    if model["e"].get("e") is not None and model["e"]["e"].value.replace(" ", "") != EFFECT.replace(" ", ""):
        bad("policy_effect", "e", "policy_effect must be 'e = priority(p.eft) || deny' "
                                  "(the loader orders rules by precedence; the first applicable one decides)")
    if model["m"].get("m") is not None:
        why = matcher_problem(model["m"]["m"].value)
        if why:
            bad("matchers", "m", why)
    if problems:
        raise PolicyError(problems)
    return model


def new_enforcer(model_text: str, rules: Sequence[Sequence[str]], links: dict[str, Iterable[Sequence[str]]]
                 ) -> casbin.Enforcer:
    """A Casbin enforcer over ``rules`` (kept in the given order) and grouping ``links`` per g, g2, g3.

    >>> e = new_enforcer(MODEL, [("staff", "billing", "contact", "read", "allow", "")],
    ...                  {"g": [("app", "staff")], "g3": [("contact.email", "contact")]})
    >>> e.enforce_ex("app", "billing", "contact.email", "read")
    (True, ['staff', 'billing', 'contact', 'read', 'allow', ''])
    >>> e.enforce_ex("app", "billing", "contact.email", "write")
    (False, [])
    """
    model = casbin.Model()
    model.load_model_from_text(model_text)
    enforcer = casbin.Enforcer(model)
    for ptype, pairs in links.items():
        pairs = [list(p) for p in pairs]
        if pairs:
            enforcer.add_named_grouping_policies(ptype, pairs)
    if rules:
        enforcer.add_policies([list(r) for r in rules])
    return enforcer
