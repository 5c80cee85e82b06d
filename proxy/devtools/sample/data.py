"""Fake rows for the sample ISP / telecom schema (schema.sql), generated deterministically from a seed.

Every person, number and address here is made up: names are drawn from lists of
common Japanese names, e-mail addresses use the reserved ``example`` domains,
card numbers use the 400000 test range (Luhn-valid, issued to nobody), and the
same seed always gives the same rows (dates count from a fixed day, not today).

``generate(seed, members)`` returns the tables in load order; ``load(conn)``
writes them through an asyncpg connection with COPY; ``to_sql()`` renders them
as INSERT statements (``python -m proxy.devtools.sample.data > data.sql``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable

SCHEMA_SQL = Path(__file__).with_name("schema.sql")
JST = dt.timezone(dt.timedelta(hours=9))
TODAY = dt.date(2024, 6, 30)  # the data's "today": fixed so that the rows never change
NOW = dt.datetime(2024, 6, 30, 18, 0, tzinfo=JST)

FAMILY = [("佐藤", "サトウ", "sato"), ("鈴木", "スズキ", "suzuki"), ("高橋", "タカハシ", "takahashi"),
          ("田中", "タナカ", "tanaka"), ("伊藤", "イトウ", "ito"), ("渡辺", "ワタナベ", "watanabe"),
          ("山本", "ヤマモト", "yamamoto"), ("中村", "ナカムラ", "nakamura"), ("小林", "コバヤシ", "kobayashi"),
          ("加藤", "カトウ", "kato"), ("吉田", "ヨシダ", "yoshida"), ("山田", "ヤマダ", "yamada"),
          ("佐々木", "ササキ", "sasaki"), ("山口", "ヤマグチ", "yamaguchi"), ("松本", "マツモト", "matsumoto"),
          ("井上", "イノウエ", "inoue"), ("木村", "キムラ", "kimura"), ("林", "ハヤシ", "hayashi"),
          ("斎藤", "サイトウ", "saito"), ("清水", "シミズ", "shimizu")]
GIVEN = [("翔太", "ショウタ", "shota", "male"), ("陽菜", "ヒナ", "hina", "female"),
         ("大翔", "ヒロト", "hiroto", "male"), ("結衣", "ユイ", "yui", "female"),
         ("蓮", "レン", "ren", "male"), ("美咲", "ミサキ", "misaki", "female"),
         ("健太", "ケンタ", "kenta", "male"), ("葵", "アオイ", "aoi", "female"),
         ("拓海", "タクミ", "takumi", "male"), ("さくら", "サクラ", "sakura", "female"),
         ("直樹", "ナオキ", "naoki", "male"), ("由美", "ユミ", "yumi", "female"),
         ("和也", "カズヤ", "kazuya", "male"), ("恵子", "ケイコ", "keiko", "female"),
         ("誠", "マコト", "makoto", "male"), ("裕子", "ユウコ", "yuko", "female")]
PLACES = [("東京都", "世田谷区", "1"), ("東京都", "杉並区", "1"), ("神奈川県", "横浜市港北区", "2"),
          ("大阪府", "大阪市北区", "5"), ("愛知県", "名古屋市中区", "4"), ("福岡県", "福岡市中央区", "8"),
          ("北海道", "札幌市中央区", "0"), ("宮城県", "仙台市青葉区", "9"), ("京都府", "京都市左京区", "6"),
          ("広島県", "広島市中区", "7"), ("埼玉県", "さいたま市浦和区", "3"), ("千葉県", "千葉市中央区", "2")]
TOWNS = ["本町", "中央", "緑が丘", "桜台", "東町", "西町", "南台", "北原"]
DOMAINS = ["example.jp", "example.com", "example.net", "mail.example"]
PLANS = [(1, "光ファイバー ギガ", "ftth", 4980), (2, "光ファイバー ライト", "ftth", 3980),
         (3, "ADSL 12M", "dsl", 2480), (4, "モバイル 3GB", "mobile", 1320), (5, "モバイル 20GB", "mobile", 2970),
         (6, "メールアドレス", "mail", 220)]
PAGES = ["/", "/service/fiber", "/service/mobile", "/campaign/summer", "/support/faq", "/support/contact",
         "/mypage", "/mypage/bill", "/news/2024/06", "/shop/router", "/shop/smartphone", "/travel"]
BROWSERS = [("Chrome", "Windows", "pc"), ("Edge", "Windows", "pc"), ("Safari", "macOS", "pc"),
            ("Safari", "iOS", "smartphone"), ("Chrome", "Android", "smartphone"), ("Safari", "iPadOS", "tablet")]
TOPICS = [("connection", "インターネットに接続できません", "昨日の夜から光回線がつながりません。ルーターのランプは赤です。"),
          ("billing", "請求金額について", "今月の請求額が先月より高いのですが、内訳を教えてください。"),
          ("plan", "プラン変更の相談", "モバイル3GBから20GBへの変更を検討しています。手続きを教えてください。"),
          ("mail", "メールが受信できない", "メールソフトでエラーが出て受信できません。設定を確認したいです。"),
          ("cancellation", "解約の手続き", "引っ越しのため解約したいです。工事は必要ですか。"),
          ("address", "住所変更", "転居しましたので請求書の送付先を変更してください。")]
SEGMENTS = [(1, "travel", "旅行に関心"), (2, "gadgets", "スマートフォン・ガジェットに関心"),
            (3, "family", "家族向けプラン・サービスに関心"), (4, "gaming", "オンラインゲームに関心"),
            (5, "finance", "家計・ポイントに関心"), (6, "fiber_upgrade", "回線の高速化に関心")]
EVENTS = [(1, "光回線 活用セミナー", "seminar", dt.date(2024, 3, 16), "東京 本社セミナールーム"),
          (2, "IoT 展示会 2024", "exhibition", dt.date(2024, 4, 20), "幕張 展示ホール"),
          (3, "夏のキャンペーン抽選会", "campaign", dt.date(2024, 6, 1), "オンライン"),
          (4, "法人向けクラウド説明会", "seminar", dt.date(2024, 5, 22), "大阪 支社"),
          (5, "親子でプログラミング教室", "seminar", dt.date(2024, 6, 15), "名古屋 会議室")]
COMPANIES = [(1, "サンプル電機株式会社", "electronics"), (2, "例示トラベル株式会社", "travel"),
             (3, "テスト保険株式会社", "insurance"), (4, "架空ホスティング株式会社", "hosting"),
             (5, "モック出版株式会社", "publishing"), (6, "ダミー物流株式会社", "logistics")]
DOCUMENTS = ["driving_licence", "passport", "health_insurance", "residence_card"]
CARRIERS = ["KDX", "SBX", "RKX", "MVX"]  # made-up carrier codes


@dataclass
class Table:
    """One table's rows, in the column order of schema.sql."""

    name: str  # schema.table
    columns: tuple[str, ...]
    rows: list[tuple] = field(default_factory=list)

    @property
    def schema(self) -> str:
        return self.name.split(".")[0]

    @property
    def table(self) -> str:
        return self.name.split(".")[1]


def _luhn_complete(prefix: str) -> str:
    """``prefix`` with the Luhn check digit appended.

    >>> _luhn_complete("411111111111111")
    '4111111111111111'
    """
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return prefix + str((10 - total % 10) % 10)


def _ts(rng: random.Random, start: dt.datetime, end: dt.datetime) -> dt.datetime:
    span = int((end - start).total_seconds())
    return start + dt.timedelta(seconds=rng.randrange(max(span, 1)))


def _phone(rng: random.Random, mobile: bool = True) -> str:
    head = rng.choice(["090", "080", "070"]) if mobile else "03"
    return f"{head}-0{rng.randrange(100, 1000)}-{rng.randrange(10000):04d}"


def _month_starts(n: int) -> list[dt.date]:
    out, y, m = [], TODAY.year, TODAY.month
    for _ in range(n):
        out.append(dt.date(y, m, 1))
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return sorted(out)


def generate(seed: int = 42, members: int = 300) -> list[Table]:
    """Every table of the sample schema with fake rows, in an order that satisfies the foreign keys.

    >>> tables = generate(members=30)
    >>> [t.name for t in tables][:3]
    ['service.plans', 'member.members', 'member.identity_checks']
    >>> generate(members=30)[1].rows == tables[1].rows  # deterministic
    True
    """
    rng = random.Random(seed)
    out: dict[str, Table] = {}

    def table(name: str, *columns: str) -> Table:
        out[name] = Table(name, columns)
        return out[name]

    start = dt.datetime(2018, 4, 1, tzinfo=JST)
    table("service.plans", "plan_id", "name", "kind", "monthly_fee").rows = list(PLANS)

    # -- members ---------------------------------------------------------------------------
    mem = table("member.members", "member_id", "member_number", "user_id", "family_name", "given_name",
                "family_name_kana", "given_name_kana", "birth_date", "gender", "email", "phone", "postal_code",
                "prefecture", "address", "status", "joined_at", "cancelled_at")
    people = []
    for i in range(1, members + 1):
        fam, fam_kana, fam_rom = rng.choice(FAMILY)
        giv, giv_kana, giv_rom, gender = rng.choice(GIVEN)
        minor = rng.random() < 0.06
        age = rng.randrange(10, 16) if minor else rng.randrange(18, 85)
        birth = TODAY - dt.timedelta(days=age * 365 + rng.randrange(365))
        pref, city, zip_head = rng.choice(PLACES)
        postal = f"{zip_head}{rng.randrange(10, 100)}-{rng.randrange(10000):04d}"
        address = f"{pref}{city}{rng.choice(TOWNS)}{rng.randrange(1, 6)}丁目{rng.randrange(1, 30)}-{rng.randrange(1, 20)}"
        user_id = f"{giv_rom}.{fam_rom}{i}"
        email = f"{user_id}@{rng.choice(DOMAINS)}"
        joined = _ts(rng, start, NOW - dt.timedelta(days=200))
        status = rng.choices(["active", "suspended", "cancelled"], [88, 4, 8])[0]
        cancelled = _ts(rng, joined, NOW) if status == "cancelled" else None
        mem.rows.append((i, f"BG{10000000 + i * 7919 % 9000000:08d}", user_id, fam, giv, fam_kana, giv_kana, birth,
                         gender, email, _phone(rng), postal, pref, address, status,
                         joined, cancelled))
        people.append({"id": i, "minor": minor, "joined": joined, "status": status, "name": f"{fam} {giv}",
                       "family": fam, "given": giv, "birth": birth, "address": address, "postal": postal,
                       "email": email, "gender": gender})
    active = [p for p in people if p["status"] != "cancelled"]

    checks = table("member.identity_checks", "check_id", "member_id", "document_type", "document_number",
                   "checked_at", "result")
    for p in people:
        doc = "health_insurance" if p["minor"] else rng.choice(DOCUMENTS)
        checks.rows.append((len(checks.rows) + 1, p["id"], doc, f"{rng.randrange(10**11, 10**12)}",
                            p["joined"] + dt.timedelta(hours=rng.randrange(1, 48)),
                            "verified" if rng.random() < 0.97 else "rejected"))

    consents = table("member.guardian_consents", "consent_id", "member_id", "guardian_name", "guardian_relationship",
                     "guardian_phone", "scope", "consented_at", "revoked_at")
    for p in people:
        if p["minor"]:
            parent_given = rng.choice(GIVEN)[0]
            consents.rows.append((len(consents.rows) + 1, p["id"], f"{p['family']} {parent_given}",
                                  rng.choice(["父", "母"]), _phone(rng), "service_use",
                                  p["joined"] - dt.timedelta(days=rng.randrange(1, 10)),
                                  None if rng.random() < 0.9 else NOW - dt.timedelta(days=rng.randrange(1, 60))))

    # Stop-of-use requests: some members withdrew announcements and advertising.
    decisions = table("privacy.consents", "member_id", "purpose", "status", "recorded_at")
    for p in people:
        if rng.random() < 0.15:
            decisions.rows.append((p["id"], rng.choice(["marketing", "marketing.announcements"]), "withdrawn",
                                   _ts(rng, p["joined"], NOW)))

    # -- billing ---------------------------------------------------------------------------
    methods = table("billing.payment_methods", "method_id", "member_id", "kind", "card_brand", "card_number",
                    "card_expiry", "bank_name", "account_number", "account_holder", "registered_at")
    method_of = {}
    for p in people:
        mid = len(methods.rows) + 1
        method_of[p["id"]] = mid
        if rng.random() < 0.7:
            number = _luhn_complete("400000" + "".join(str(rng.randrange(10)) for _ in range(9)))
            methods.rows.append((mid, p["id"], "card", "VISA", number,
                                 f"{rng.randrange(1, 13):02d}/{rng.randrange(25, 31)}", None, None, None,
                                 p["joined"]))
        else:
            methods.rows.append((mid, p["id"], "bank", None, None, None,
                                 rng.choice(["サンプル銀行", "例示信用金庫", "テスト銀行"]),
                                 f"{rng.randrange(10**6, 10**7)}", p["family"] + " " + p["given"], p["joined"]))

    subs = table("telecom.subscriptions", "subscription_id", "member_id", "plan_id", "access_id", "install_date",
                 "started_on", "ended_on", "status")
    plan_of = {}
    for p in people:
        plan = rng.choice(PLANS)
        plan_of[p["id"]] = plan
        started = p["joined"].date()
        ended = None if p["status"] != "cancelled" else (p["joined"] + dt.timedelta(days=400)).date()
        if ended is not None and ended > TODAY:
            ended = TODAY
        subs.rows.append((len(subs.rows) + 1, p["id"], plan[0], f"xa{100000 + p['id']}@isp.example",
                          started - dt.timedelta(days=rng.randrange(7, 30)) if plan[2] in ("ftth", "dsl") else None,
                          started, ended, {"active": "active", "suspended": "suspended"}.get(p["status"], "ended")))

    invoices = table("billing.invoices", "invoice_id", "member_id", "plan_id", "billing_month", "amount", "tax",
                     "issued_at", "due_date", "status")
    payments = table("billing.payments", "payment_id", "invoice_id", "member_id", "method_id", "paid_at", "amount")
    overdue = []
    for month in _month_starts(6):
        for p in active:
            plan = plan_of[p["id"]]
            amount = plan[3] + rng.choice([0, 0, 0, 330, 550, 1100])
            tax = amount // 10
            issued = dt.datetime(month.year, month.month, 5, 9, 0, tzinfo=JST)
            due = (month + dt.timedelta(days=45)).replace(day=27)
            late = p["status"] == "suspended" or rng.random() < 0.03
            status = "paid" if not late else ("overdue" if due < TODAY else "unpaid")
            iid = len(invoices.rows) + 1
            invoices.rows.append((iid, p["id"], plan[0], month, amount, tax, issued, due, status))
            if status == "paid":
                payments.rows.append((len(payments.rows) + 1, iid, p["id"], method_of[p["id"]],
                                      dt.datetime.combine(due - dt.timedelta(days=rng.randrange(0, 20)),
                                                          dt.time(10), JST), amount + tax))
            elif status == "overdue":
                overdue.append((p["id"], iid, due, amount + tax))

    # -- credit ----------------------------------------------------------------------------
    assessments = table("credit.assessments", "assessment_id", "member_id", "assessed_at", "score", "credit_limit",
                        "decision")
    for p in people:
        score = rng.randrange(420, 900)
        decision = "approved" if score >= 600 else ("limited" if score >= 480 else "declined")
        assessments.rows.append((len(assessments.rows) + 1, p["id"], p["joined"] - dt.timedelta(days=1), score,
                                 {"approved": 100000, "limited": 30000, "declined": 0}[decision], decision))

    delinquencies = table("credit.delinquencies", "delinquency_id", "member_id", "invoice_id", "overdue_since",
                          "overdue_amount", "collection_stage", "resolved_at")
    for member_id, iid, due, amount in overdue:
        stage = rng.choice(["reminder", "reminder", "demand", "collection"])
        delinquencies.rows.append((len(delinquencies.rows) + 1, member_id, iid, due, amount, stage,
                                   None if rng.random() < 0.8 else NOW - dt.timedelta(days=rng.randrange(1, 30))))

    exchange = table("credit.nonpayer_exchange", "exchange_id", "member_id", "carrier_code", "direction",
                     "exchanged_at", "family_name", "given_name", "birth_date", "phone", "address", "unpaid_amount")
    reported = sorted({d[1] for d in delinquencies.rows if d[5] in ("demand", "collection")})
    by_id = {p["id"]: p for p in people}
    for member_id in reported:
        p = by_id[member_id]
        exchange.rows.append((len(exchange.rows) + 1, member_id, rng.choice(CARRIERS), "sent",
                              NOW - dt.timedelta(days=rng.randrange(1, 90)), p["family"], p["given"], p["birth"],
                              _phone(rng), p["address"], rng.randrange(3000, 40000)))
    for _ in range(max(3, members // 50)):  # received about people who are not our members
        fam = rng.choice(FAMILY)[0]
        giv = rng.choice(GIVEN)[0]
        pref, city, _ = rng.choice(PLACES)
        exchange.rows.append((len(exchange.rows) + 1, None, rng.choice(CARRIERS), "received",
                              NOW - dt.timedelta(days=rng.randrange(1, 90)), fam, giv,
                              TODAY - dt.timedelta(days=rng.randrange(20 * 365, 70 * 365)), _phone(rng),
                              f"{pref}{city}{rng.choice(TOWNS)}{rng.randrange(1, 6)}丁目{rng.randrange(1, 30)}",
                              rng.randrange(3000, 60000)))

    # -- browsing (000 part B) ---------------------------------------------------------------
    mailings = table("browsing.mailings", "mailing_id", "subject", "kind", "sent_at")
    mailings.rows = [(1, "サンプルISP通信 5月号", "newsletter", dt.datetime(2024, 5, 10, 10, tzinfo=JST)),
                     (2, "夏のキャンペーンのご案内", "campaign", dt.datetime(2024, 6, 3, 12, tzinfo=JST)),
                     (3, "料金改定のお知らせ", "notice", dt.datetime(2024, 6, 12, 9, tzinfo=JST)),
                     (4, "サンプルISP通信 6月号", "newsletter", dt.datetime(2024, 6, 14, 10, tzinfo=JST)),
                     (5, "スマートフォン買い替えキャンペーン", "campaign", dt.datetime(2024, 6, 20, 12, tzinfo=JST))]
    cookies = table("browsing.cookies", "cookie_id", "member_id", "first_seen", "last_seen", "auto_login")
    cookie_ids = []
    for n in range(int(members * 1.4)):
        cid = hashlib.sha256(f"cookie-{seed}-{n}".encode()).hexdigest()[:24]
        member = rng.choice(people)["id"] if rng.random() < 0.75 else None
        first = _ts(rng, NOW - dt.timedelta(days=365), NOW - dt.timedelta(days=30))
        cookies.rows.append((cid, member, first, _ts(rng, first, NOW), member is not None and rng.random() < 0.6))
        cookie_ids.append((cid, member))
    views = table("browsing.page_views", "view_id", "cookie_id", "member_id", "url", "referrer", "viewed_at",
                  "browser", "os", "platform")
    for n in range(members * 10):
        cid, member = rng.choice(cookie_ids)
        browser, os_name, platform = rng.choice(BROWSERS)
        views.rows.append((n + 1, cid, member, "https://www.isp.example" + rng.choice(PAGES),
                           rng.choice([None, "https://search.example/?q=isp", "https://www.isp.example/"]),
                           _ts(rng, NOW - dt.timedelta(days=60), NOW), browser, os_name, platform))
    mail_events = table("browsing.mail_events", "event_id", "mailing_id", "member_id", "kind", "url", "occurred_at")
    beacons = table("browsing.beacon_hits", "hit_id", "beacon_id", "cookie_id", "member_id", "page_url",
                    "mailing_id", "hit_at")
    purls = table("browsing.personal_urls", "token", "member_id", "mailing_id", "target_url", "issued_at",
                  "clicked_at")
    for mailing_id, _, kind, sent in mailings.rows:
        for p in active:
            if kind != "notice" and rng.random() < 0.5:
                continue
            token = hashlib.sha256(f"purl-{seed}-{mailing_id}-{p['id']}".encode()).hexdigest()[:32]
            opened = rng.random() < 0.45
            clicked = opened and rng.random() < 0.35
            purls.rows.append((token, p["id"], mailing_id, "https://www.isp.example" + rng.choice(PAGES), sent,
                               sent + dt.timedelta(hours=rng.randrange(1, 72)) if clicked else None))
            if opened:
                at = sent + dt.timedelta(minutes=rng.randrange(5, 3000))
                mail_events.rows.append((len(mail_events.rows) + 1, mailing_id, p["id"], "open", None, at))
                beacons.rows.append((len(beacons.rows) + 1, f"mail-{mailing_id}", None, p["id"], None, mailing_id,
                                     at))
            if clicked:
                mail_events.rows.append((len(mail_events.rows) + 1, mailing_id, p["id"], "click",
                                         f"https://www.isp.example/r/{token}",
                                         sent + dt.timedelta(minutes=rng.randrange(3000, 6000))))
    for n in range(members * 2):
        cid, member = rng.choice(cookie_ids)
        beacons.rows.append((len(beacons.rows) + 1, f"page-{rng.randrange(1, 9)}", cid, member,
                             "https://www.isp.example" + rng.choice(PAGES), None,
                             _ts(rng, NOW - dt.timedelta(days=60), NOW)))

    table("ads.segments", "segment_id", "name", "description").rows = list(SEGMENTS)
    profiles = table("ads.interest_profiles", "profile_id", "member_id", "cookie_id", "segment_id", "score",
                     "computed_at")
    for cid, member in cookie_ids:
        for seg in rng.sample(SEGMENTS, rng.randrange(1, 3)):
            profiles.rows.append((len(profiles.rows) + 1, member, cid, seg[0],
                                  Decimal(rng.randrange(100, 1000)) / 1000, NOW - dt.timedelta(days=1)))

    # -- support ----------------------------------------------------------------------------
    table("support.operators", "operator_id", "team", "site").rows = [
        (1, "technical", "札幌"), (2, "technical", "札幌"), (3, "billing", "福岡"), (4, "billing", "福岡"),
        (5, "general", "那覇"), (6, "general", "那覇"), (7, "outbound", "東京"), (8, "quality", "東京")]
    inquiries = table("support.inquiries", "inquiry_id", "member_id", "received_at", "channel", "topic", "subject",
                      "body", "status", "operator_id")
    calls = table("support.call_recordings", "recording_id", "inquiry_id", "member_id", "direction", "started_at",
                  "duration_seconds", "operator_id", "caller_number", "transcript", "audio")
    phone_of = {row[0]: row[10] for row in mem.rows}
    for n in range(max(10, members * 2 // 3)):
        p = rng.choice(people)
        topic, subject, body = rng.choice(TOPICS)
        channel = rng.choice(["phone", "phone", "mail", "web", "chat"])
        received = _ts(rng, NOW - dt.timedelta(days=120), NOW)
        operator = rng.randrange(1, 7)
        iid = n + 1
        inquiries.rows.append((iid, p["id"], received, channel, topic, subject, body,
                               rng.choice(["open", "answered", "closed", "closed"]), operator))
        if channel == "phone":
            transcript = (f"オペレーター: お電話ありがとうございます。ご用件をお伺いします。\n"
                          f"お客さま: {body}\nオペレーター: 確認いたします。少々お待ちください。")
            audio = b"RIFF" + hashlib.sha256(f"audio-{seed}-{iid}".encode()).digest()  # a stand-in, not audio
            calls.rows.append((len(calls.rows) + 1, iid, p["id"], "inbound", received,
                               rng.randrange(60, 1500), operator, phone_of[p["id"]], transcript, audio))
    for p in rng.sample(active, min(len(active), max(3, members // 20))):  # outbound sales calls
        calls.rows.append((len(calls.rows) + 1, None, p["id"], "outbound", _ts(rng, NOW - dt.timedelta(days=60), NOW),
                           rng.randrange(30, 600), 7, phone_of[p["id"]],
                           "オペレーター: 光回線の新しいプランのご案内でお電話しました。\nお客さま: 今は結構です。",
                           b"RIFF" + hashlib.sha256(f"audio-out-{seed}-{p['id']}".encode()).digest()))

    # -- events ----------------------------------------------------------------------------
    table("events.events", "event_id", "title", "kind", "held_on", "venue").rows = list(EVENTS)
    participants = table("events.participants", "participant_id", "event_id", "member_id", "name", "company",
                         "email", "phone", "registered_at", "attended")
    for event_id, _, kind, held_on, _ in EVENTS:
        for _ in range(rng.randrange(15, 40)):
            if rng.random() < 0.6:
                p = rng.choice(people)
                member, name, email = p["id"], p["name"], p["email"]
            else:
                fam, _, fam_rom = rng.choice(FAMILY)
                giv, _, giv_rom, _ = rng.choice(GIVEN)
                member, name, email = None, f"{fam} {giv}", f"{giv_rom}.{fam_rom}@{rng.choice(DOMAINS)}"
            participants.rows.append((len(participants.rows) + 1, event_id, member, name,
                                      rng.choice([None, rng.choice(COMPANIES)[1]]), email,
                                      rng.choice([None, _phone(rng)]),
                                      dt.datetime.combine(held_on - dt.timedelta(days=rng.randrange(3, 40)),
                                                          dt.time(12), JST),
                                      held_on < TODAY and rng.random() < 0.8))

    # -- partners ----------------------------------------------------------------------------
    table("partners.companies", "company_id", "name", "industry").rows = list(COMPANIES)
    contacts = table("partners.contacts", "contact_id", "company_id", "name", "department", "title", "email", "phone")
    for company_id, _, _ in COMPANIES:
        for _ in range(rng.randrange(2, 4)):
            fam, _, fam_rom = rng.choice(FAMILY)
            giv, _, giv_rom, _ = rng.choice(GIVEN)
            contacts.rows.append((len(contacts.rows) + 1, company_id, f"{fam} {giv}",
                                  rng.choice(["営業部", "企画部", "購買部", None]), rng.choice(["部長", "課長", "担当", None]),
                                  f"{giv_rom}.{fam_rom}@partner{company_id}.example", _phone(rng, mobile=False)))
    recipients = table("partners.delivery_recipients", "recipient_id", "company_id", "name", "email", "postal_code",
                       "address")
    for _ in range(max(10, members // 5)):
        fam, _, fam_rom = rng.choice(FAMILY)
        giv, _, giv_rom, _ = rng.choice(GIVEN)
        pref, city, zip_head = rng.choice(PLACES)
        recipients.rows.append((len(recipients.rows) + 1, rng.choice([5, 6]), f"{fam} {giv}",
                                f"{giv_rom}{rng.randrange(100)}@{rng.choice(DOMAINS)}",
                                f"{zip_head}{rng.randrange(10, 100)}-{rng.randrange(10000):04d}",
                                f"{pref}{city}{rng.choice(TOWNS)}{rng.randrange(1, 6)}丁目{rng.randrange(1, 30)}"))
    referrals = table("partners.referrals", "referral_id", "member_id", "company_id", "product", "referred_at",
                      "status")
    for p in rng.sample(active, min(len(active), max(5, members // 6))):
        company = rng.choice(COMPANIES[:3])
        referrals.rows.append((len(referrals.rows) + 1, p["id"], company[0],
                               {1: "スマート家電セット", 2: "国内旅行パック", 3: "端末補償保険"}[company[0]],
                               _ts(rng, NOW - dt.timedelta(days=180), NOW),
                               rng.choice(["referred", "contracted", "declined"])))

    # -- prizes ----------------------------------------------------------------------------
    winners = table("prizes.winners", "winner_id", "member_id", "campaign", "prize", "prize_value", "won_at",
                    "legal_name", "tax_address", "individual_number", "withholding_tax")
    adults = [p for p in active if not p["minor"]]
    for p in rng.sample(adults, min(len(adults), max(4, members // 25))):
        value = rng.choice([10000, 30000, 100000, 1000000])
        winners.rows.append((len(winners.rows) + 1, p["id"], "夏のキャンペーン2024",
                             {10000: "ギフトカード", 30000: "ワイヤレスイヤホン", 100000: "タブレット",
                              1000000: "賞金100万円"}[value], value, dt.datetime(2024, 6, 1, 15, tzinfo=JST),
                             p["name"], p["address"],
                             "".join(str(rng.randrange(10)) for _ in range(12)) if value > 500000 else None,
                             (value - 500000) * 1021 // 10000 if value > 500000 else 0))  # 10.21% over 500,000 yen

    # -- telecom (004) ---------------------------------------------------------------------
    sessions = table("telecom.access_sessions", "session_id", "subscription_id", "member_id", "assigned_ip",
                     "started_at", "ended_at", "bytes_in", "bytes_out")
    logs = table("telecom.communication_logs", "log_id", "subscription_id", "member_id", "occurred_at", "src_ip",
                 "dst_ip", "dst_port", "protocol", "dns_query", "bytes")
    live = [row for row in subs.rows if row[7] != "ended" and PLANS[row[2] - 1][2] in ("ftth", "dsl", "mobile")]
    for n in range(members * 5):
        sub = rng.choice(live)
        begin = _ts(rng, NOW - dt.timedelta(days=30), NOW)
        ip = f"198.51.100.{rng.randrange(1, 255)}" if rng.random() < 0.5 else f"203.0.113.{rng.randrange(1, 255)}"
        sessions.rows.append((n + 1, sub[0], sub[1], ip, begin,
                              begin + dt.timedelta(minutes=rng.randrange(5, 2000)) if rng.random() < 0.9 else None,
                              rng.randrange(10**6, 10**10), rng.randrange(10**5, 10**9)))
    sites = [("192.0.2.10", 443, "tcp", "www.shop.example"), ("192.0.2.20", 443, "tcp", "video.example"),
             ("192.0.2.30", 53, "udp", "mail.example"), ("192.0.2.40", 443, "tcp", "news.example"),
             ("192.0.2.50", 3478, "udp", "game.example")]
    for n in range(members * 10):
        s = rng.choice(sessions.rows)
        dst, port, proto, name = rng.choice(sites)
        logs.rows.append((n + 1, s[1], s[2], s[4] + dt.timedelta(seconds=rng.randrange(0, 3600)), s[3], dst, port,
                          proto, name, rng.randrange(500, 5 * 10**7)))
    notices = table("telecom.notices", "notice_id", "member_id", "kind", "channel", "sent_at")
    for p in people:
        for _ in range(rng.randrange(0, 3)):
            notices.rows.append((len(notices.rows) + 1, p["id"],
                                 rng.choice(["fee_change", "terms_change", "construction_date", "suspension",
                                             "termination"]),
                                 rng.choice(["email", "email", "post", "sms"]), _ts(rng, p["joined"], NOW)))

    order = ["service.plans", "member.members", "member.identity_checks", "member.guardian_consents",
             "billing.payment_methods", "billing.invoices", "billing.payments", "credit.assessments",
             "credit.delinquencies", "credit.nonpayer_exchange", "browsing.mailings", "browsing.cookies",
             "browsing.page_views", "browsing.mail_events", "browsing.beacon_hits", "browsing.personal_urls",
             "ads.segments", "ads.interest_profiles", "support.operators", "support.inquiries",
             "support.call_recordings", "events.events", "events.participants", "partners.companies",
             "partners.contacts", "partners.delivery_recipients", "partners.referrals", "prizes.winners",
             "telecom.subscriptions", "telecom.access_sessions", "telecom.communication_logs", "telecom.notices",
             "privacy.consents"]
    assert sorted(order) == sorted(out), set(order) ^ set(out)
    return [out[name] for name in order]


async def load(conn: Any, tables: Iterable[Table] | None = None, schema_sql: bool = True) -> dict[str, int]:
    """Create the sample schema (unless ``schema_sql`` is false) and COPY the rows in through asyncpg.

    Returns the number of rows per table.
    """
    if schema_sql:
        await conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))
    counts = {}
    for t in tables if tables is not None else generate():
        if t.rows:
            await conn.copy_records_to_table(t.table, schema_name=t.schema, columns=list(t.columns), records=t.rows)
        counts[t.name] = len(t.rows)
    return counts


def sql_literal(value: Any) -> str:
    """A PostgreSQL literal for a generated value.

    >>> sql_literal(None), sql_literal("O'Brien"), sql_literal(True), sql_literal(b"\\x01\\xff")
    ('NULL', "'O''Brien'", 'true', "'\\\\x01ff'::bytea")
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, bytes):
        return f"'\\x{value.hex()}'::bytea"
    if isinstance(value, (dt.date, dt.datetime)):
        return f"'{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


def to_sql(tables: Iterable[Table] | None = None) -> str:
    """INSERT statements for every generated row (after schema.sql has run)."""
    lines = []
    for t in tables if tables is not None else generate():
        cols = ", ".join(t.columns)
        for row in t.rows:
            lines.append(f"INSERT INTO {t.name} ({cols}) VALUES ({', '.join(sql_literal(v) for v in row)});")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(to_sql())
