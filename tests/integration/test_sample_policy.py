"""The shipped policy on the sample database, through the real proxy and a real PostgreSQL: what the
helpers' hunts 14 and 15 got out of it stays kept in (the same cases run in process as policies/tests)."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from proxy.demo import DATABASE, PASSWORD, READER, setup_database
from proxy.devtools.cluster import Cluster, find_pg_bin
from proxy.devtools.process import ProxyProcess
from proxy.devtools.sample import policies_dir
from proxy.policy.engine import Policy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def isp():
    """A cluster of its own with the sample database (200 members) and a user aggregate named like
    count(), behind a proxy enforcing the shipped policy; yields (cluster, proxy)."""
    bin_dir = find_pg_bin()
    assert bin_dir is not None, "PostgreSQL binaries (initdb, pg_ctl) not found"
    policy = Policy.load(policies_dir())
    roles = sorted(s for s in policy.subjects if s not in policy.groups)
    cluster = Cluster(users=[], bin_dir=bin_dir, base_dir=None)
    cluster.start()
    proxy = None
    try:
        asyncio.run(setup_database(cluster, roles, 200, 1))
        with psycopg.connect(host=cluster.host, port=cluster.port, user="postgres", dbname=DATABASE,
                             autocommit=True) as conn:
            # Hunt 15: a statistical aggregate's name, taken by code that returns every input value.
            conn.execute("CREATE AGGREGATE public.count(integer) (sfunc = array_append, stype = integer[])")
        reader = f"postgresql://{READER}:{PASSWORD}@{cluster.host}:{cluster.port}/postgres"
        proxy = ProxyProcess(f"{cluster.host}:{cluster.port}", "--decider", "purpose", "--policies",
                             str(policies_dir()), "--schema-dsn", reader, "--policy-watch-interval", "0").start(60)
        yield cluster, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop()
        cluster.cleanup()


def connect(isp, role: str, purpose: str) -> psycopg.Connection:
    _, proxy = isp
    return psycopg.connect(host=proxy.host, port=proxy.port, user=role, password=PASSWORD, dbname=DATABASE,
                           autocommit=True, options=f"-c pii.purpose={purpose}")


def direct(isp, sql: str) -> list[tuple]:
    cluster, _ = isp
    with psycopg.connect(host=cluster.host, port=cluster.port, user="postgres", dbname=DATABASE) as conn:
        return conn.execute(sql).fetchall()


def refusal(conn: psycopg.Connection, sql: str) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
        conn.execute(sql).fetchall()
    return str(err.value)


def test_card_numbers_are_not_copied_where_every_purpose_reads(isp):
    with connect(isp, "app_billing", "billing") as conn:
        message = refusal(conn, "INSERT INTO service.plans (plan_id, name, kind, monthly_fee) SELECT 1000, "
                                "card_number, 'x', 0 FROM billing.payment_methods WHERE member_id = 2 LIMIT 1")
        assert "billing.payment_methods.card_number" in message and "not personal" in message
        assert "would be copied into a notification payload" in refusal(
            conn, "SELECT pg_notify('cards', card_number) FROM billing.payment_methods WHERE member_id = 2")
    assert direct(isp, "SELECT count(*) FROM service.plans WHERE plan_id >= 1000") == [(0,)]


def test_the_consent_table_does_not_list_who_withdrew_under_a_sibling_purpose(isp):
    with connect(isp, "app_marketing", "marketing.personalized") as conn:
        assert "consent.decision" in refusal(conn, "SELECT DISTINCT member_id FROM privacy.consents")


def test_row_keys_beside_hashed_member_ids_are_hashed_too(isp):
    raw_recordings = {r[0] for r in direct(isp, "SELECT recording_id::text FROM support.call_recordings")}
    raw_profiles = {r[0] for r in direct(isp, "SELECT profile_id::text FROM ads.interest_profiles")}
    assert raw_recordings and raw_profiles
    with connect(isp, "trainer", "support_quality") as conn:
        shown = {str(r[0]) for r in conn.execute("SELECT recording_id, inquiry_id FROM support.call_recordings")}
    with connect(isp, "app_marketing", "marketing.ads") as conn:
        profiles = {str(r[0]) for r in conn.execute("SELECT profile_id, segment_id FROM ads.interest_profiles")}
    assert shown and not shown & raw_recordings
    assert profiles and not profiles & raw_profiles
    # Hunt 17: a subscription's key equals its member's id; read raw next to the hashed member_id, one join
    # re-identified the pseudonymised page views.
    raw_subscriptions = {r[0] for r in direct(isp, "SELECT subscription_id::text FROM telecom.subscriptions")}
    with connect(isp, "app_marketing", "marketing.ads") as conn:
        keys = {str(r[0]) for r in conn.execute(
            "SELECT s.subscription_id, v.url FROM browsing.page_views v "
            "JOIN telecom.subscriptions s ON s.member_id = v.member_id")}
    assert raw_subscriptions and keys and not keys & raw_subscriptions


def test_a_user_aggregate_named_count_is_not_a_statistic(isp):
    every = direct(isp, "SELECT count(amount) FROM billing.invoices WHERE invoice_id <= 40")[0][0]
    assert isinstance(every, list) and len(every) == 40  # what it would hand out: the amounts themselves
    with connect(isp, "analyst", "statistics") as conn:
        message = refusal(conn, "SELECT count(amount) FROM billing.invoices WHERE invoice_id <= 40")
    assert "public.count" in message, message
    assert json.dumps(every[:3])[1:-1] not in message
