"""Purpose policy: decides whether a purpose may use what a statement touches.

Modules (imported directly; this package imports nothing, so the relay-only proxy
does not load Casbin):

- ``decision``: the closed decision type (Allow, Mask, Block).
- ``engine``: ``Policy.load(directory)``, ``RuleDecision``; the decision table.
- ``verdict``: ``decide_statement(analysis, role=, purpose=, policy=, rewrite=)`` and ``Explanation``.
- ``checks``: ``check_policy(policy, schema=, roles=)``.
- ``cases``: policy test cases and ``run_policy_tests(policy, cases, analyze, schema)``.
- ``catalog``, ``purposes``, ``rules``, ``casbin_model``: one per policy file.
- ``vocabulary``, ``sources``, ``problems``: shared constants, parsing and errors.

File formats: policies/README.md.
"""
