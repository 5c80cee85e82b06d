-- Sample ISP / telecom schema for the seed-derived policy in policies/.
--
-- It holds the kinds of personal information the two privacy notices in
-- shared/seeds/ name: the ISP notice (000: member data, data from individual
-- services, business-partner contacts, entrusted data, event participants,
-- inquiries and recorded calls; part B browsing information from cookies, web
-- beacons and personalised URLs) and the telecom notice (004: "specified user
-- information" of internet-access subscribers). Every table and column is
-- classified in policies/catalog.yaml; policies/schema.yaml lists the same
-- relations, columns and functions (tests/unit/test_sample.py keeps them equal).
-- Data: proxy/devtools/sample/data.py generates fake rows (no real person).

CREATE SCHEMA service;
CREATE SCHEMA member;
CREATE SCHEMA billing;
CREATE SCHEMA credit;
CREATE SCHEMA browsing;
CREATE SCHEMA ads;
CREATE SCHEMA support;
CREATE SCHEMA events;
CREATE SCHEMA partners;
CREATE SCHEMA prizes;
CREATE SCHEMA telecom;
CREATE SCHEMA privacy;

-- Service plans: reference data, not personal.
CREATE TABLE service.plans (
    plan_id      integer PRIMARY KEY,
    name         text NOT NULL,
    kind         text NOT NULL,            -- ftth | dsl | mobile | mail
    monthly_fee  integer NOT NULL          -- yen, before tax
);

-- Members (000 type (1): BIGLOBE members; 004: subscribers).
CREATE TABLE member.members (
    member_id         bigint PRIMARY KEY,
    member_number     text NOT NULL UNIQUE,   -- printed on contracts and invoices
    user_id           text NOT NULL UNIQUE,   -- login ID
    family_name       text NOT NULL,
    given_name        text NOT NULL,
    family_name_kana  text NOT NULL,
    given_name_kana   text NOT NULL,
    birth_date        date NOT NULL,
    gender            text,
    email             text NOT NULL,
    phone             text NOT NULL,
    postal_code       text NOT NULL,
    prefecture        text NOT NULL,
    address           text NOT NULL,
    status            text NOT NULL,          -- active | suspended | cancelled
    joined_at         timestamptz NOT NULL,
    cancelled_at      timestamptz
);

-- Identity verification (個人認証 / ご本人確認).
CREATE TABLE member.identity_checks (
    check_id         bigint PRIMARY KEY,
    member_id        bigint NOT NULL REFERENCES member.members,
    document_type    text NOT NULL,          -- driving_licence | passport | health_insurance | residence_card
    document_number  text NOT NULL,
    checked_at       timestamptz NOT NULL,
    result           text NOT NULL           -- verified | rejected
);

-- A guardian's consent for members under 16 (000: 16歳未満 ... 保護者の方の同意).
CREATE TABLE member.guardian_consents (
    consent_id             bigint PRIMARY KEY,
    member_id              bigint NOT NULL REFERENCES member.members,
    guardian_name          text NOT NULL,
    guardian_relationship  text NOT NULL,
    guardian_phone         text NOT NULL,
    scope                  text NOT NULL,    -- what the guardian agreed to
    consented_at           timestamptz NOT NULL,
    revoked_at             timestamptz
);
-- The consent filter (a further source, catalog.yaml) looks up a member's guardian consents for each row it keeps.
CREATE INDEX guardian_consents_member ON member.guardian_consents (member_id);

-- Billing and payment (料金等の請求).
CREATE TABLE billing.payment_methods (
    method_id       bigint PRIMARY KEY,
    member_id       bigint NOT NULL REFERENCES member.members,
    kind            text NOT NULL,           -- card | bank
    card_brand      text,
    card_number     text,
    card_expiry     text,
    bank_name       text,
    account_number  text,
    account_holder  text,
    registered_at   timestamptz NOT NULL
);

CREATE TABLE billing.invoices (
    invoice_id     bigint PRIMARY KEY,
    member_id      bigint NOT NULL REFERENCES member.members,
    plan_id        integer NOT NULL REFERENCES service.plans,
    billing_month  date NOT NULL,
    amount         integer NOT NULL,
    tax            integer NOT NULL,
    issued_at      timestamptz NOT NULL,
    due_date       date NOT NULL,
    status         text NOT NULL             -- paid | unpaid | overdue
);

CREATE TABLE billing.payments (
    payment_id  bigint PRIMARY KEY,
    invoice_id  bigint NOT NULL REFERENCES billing.invoices,
    member_id   bigint NOT NULL REFERENCES member.members,
    method_id   bigint REFERENCES billing.payment_methods,
    paid_at     timestamptz NOT NULL,
    amount      integer NOT NULL
);

-- The balance a member still owes: reads invoices and payments (declared in catalog.yaml).
CREATE FUNCTION billing.outstanding_balance(p_member bigint) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
      SELECT coalesce(sum(i.amount + i.tax), 0)
             - coalesce((SELECT sum(p.amount) FROM billing.payments p WHERE p.member_id = p_member), 0)
        FROM billing.invoices i
       WHERE i.member_id = p_member
    $$;

-- Credit management (与信管理) and non-payer information (不払者情報).
CREATE TABLE credit.assessments (
    assessment_id  bigint PRIMARY KEY,
    member_id      bigint NOT NULL REFERENCES member.members,
    assessed_at    timestamptz NOT NULL,
    score          integer NOT NULL,
    credit_limit   integer NOT NULL,
    decision       text NOT NULL             -- approved | limited | declined
);

CREATE TABLE credit.delinquencies (
    delinquency_id    bigint PRIMARY KEY,
    member_id         bigint NOT NULL REFERENCES member.members,
    invoice_id        bigint NOT NULL REFERENCES billing.invoices,
    overdue_since     date NOT NULL,
    overdue_amount    integer NOT NULL,
    collection_stage  text NOT NULL,         -- reminder | demand | collection | written_off
    resolved_at       timestamptz
);

-- Records exchanged with other carriers (携帯電話等の不払者情報の交換).
CREATE TABLE credit.nonpayer_exchange (
    exchange_id    bigint PRIMARY KEY,
    member_id      bigint REFERENCES member.members,   -- NULL for records received about non-members
    carrier_code   text NOT NULL,
    direction      text NOT NULL,            -- sent | received
    exchanged_at   timestamptz NOT NULL,
    family_name    text NOT NULL,
    given_name     text NOT NULL,
    birth_date     date NOT NULL,
    phone          text NOT NULL,
    address        text NOT NULL,
    unpaid_amount  integer NOT NULL
);

-- Browsing information (000 part B).
CREATE TABLE browsing.mailings (
    mailing_id  integer PRIMARY KEY,
    subject     text NOT NULL,
    kind        text NOT NULL,               -- newsletter | campaign | notice
    sent_at     timestamptz NOT NULL
);

CREATE TABLE browsing.cookies (
    cookie_id   text PRIMARY KEY,
    member_id   bigint REFERENCES member.members,  -- NULL until the browser logs in
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    auto_login  boolean NOT NULL             -- used to recognise the member (自動ログイン)
);

CREATE TABLE browsing.page_views (
    view_id    bigint PRIMARY KEY,
    cookie_id  text NOT NULL REFERENCES browsing.cookies,
    member_id  bigint REFERENCES member.members,
    url        text NOT NULL,
    referrer   text,
    viewed_at  timestamptz NOT NULL,
    browser    text NOT NULL,
    os         text NOT NULL,
    platform   text NOT NULL                 -- pc | smartphone | tablet
);

CREATE TABLE browsing.mail_events (
    event_id     bigint PRIMARY KEY,
    mailing_id   integer NOT NULL REFERENCES browsing.mailings,
    member_id    bigint NOT NULL REFERENCES member.members,
    kind         text NOT NULL,              -- open | click
    url          text,                       -- the URL clicked
    occurred_at  timestamptz NOT NULL
);

CREATE TABLE browsing.beacon_hits (
    hit_id      bigint PRIMARY KEY,
    beacon_id   text NOT NULL,
    cookie_id   text REFERENCES browsing.cookies,
    member_id   bigint REFERENCES member.members,
    page_url    text,
    mailing_id  integer REFERENCES browsing.mailings,
    hit_at      timestamptz NOT NULL
);

-- Personalised URLs: encrypted parameters identifying the member (個別URL).
CREATE TABLE browsing.personal_urls (
    token       text PRIMARY KEY,
    member_id   bigint NOT NULL REFERENCES member.members,
    mailing_id  integer NOT NULL REFERENCES browsing.mailings,
    target_url  text NOT NULL,
    issued_at   timestamptz NOT NULL,
    clicked_at  timestamptz
);

-- Browsing information combined with information identifying the member (000 part B).
CREATE VIEW browsing.member_page_views AS
    SELECT v.view_id, v.member_id, m.family_name, m.given_name, m.email, v.url, v.viewed_at
      FROM browsing.page_views v
      JOIN member.members m ON m.member_id = v.member_id;

-- Results of behaviour analysis (004 purpose 5).
CREATE TABLE ads.segments (
    segment_id   integer PRIMARY KEY,
    name         text NOT NULL,
    description  text NOT NULL
);

CREATE TABLE ads.interest_profiles (
    profile_id   bigint PRIMARY KEY,
    member_id    bigint REFERENCES member.members,
    cookie_id    text REFERENCES browsing.cookies,
    segment_id   integer NOT NULL REFERENCES ads.segments,
    score        numeric(4, 3) NOT NULL,
    computed_at  timestamptz NOT NULL
);

-- Inquiries and recorded calls (000 type (5); 004 取得方法).
CREATE TABLE support.operators (
    operator_id  integer PRIMARY KEY,
    team         text NOT NULL,
    site         text NOT NULL
);

CREATE TABLE support.inquiries (
    inquiry_id   bigint PRIMARY KEY,
    member_id    bigint REFERENCES member.members,
    received_at  timestamptz NOT NULL,
    channel      text NOT NULL,              -- phone | mail | web | chat
    topic        text NOT NULL,
    subject      text NOT NULL,
    body         text NOT NULL,
    status       text NOT NULL,              -- open | answered | closed
    operator_id  integer REFERENCES support.operators
);

CREATE TABLE support.call_recordings (
    recording_id      bigint PRIMARY KEY,
    inquiry_id        bigint REFERENCES support.inquiries,
    member_id         bigint REFERENCES member.members,
    direction         text NOT NULL,         -- inbound | outbound
    started_at        timestamptz NOT NULL,
    duration_seconds  integer NOT NULL,
    operator_id       integer REFERENCES support.operators,
    caller_number     text NOT NULL,
    transcript        text NOT NULL,
    audio             bytea NOT NULL
);

-- What an operator sees when an inquiry comes in: the inquiry with the member's name and phone.
CREATE VIEW support.inquiry_overview AS
    SELECT i.inquiry_id, i.received_at, i.channel, i.topic, i.status,
           m.member_id, m.family_name, m.given_name, m.phone
      FROM support.inquiries i
      LEFT JOIN member.members m ON m.member_id = i.member_id;

-- Events and their participants (000 type (4)).
CREATE TABLE events.events (
    event_id  integer PRIMARY KEY,
    title     text NOT NULL,
    kind      text NOT NULL,                 -- seminar | exhibition | campaign
    held_on   date NOT NULL,
    venue     text NOT NULL
);

CREATE TABLE events.participants (
    participant_id  bigint PRIMARY KEY,
    event_id        integer NOT NULL REFERENCES events.events,
    member_id       bigint REFERENCES member.members,
    name            text NOT NULL,
    company         text,
    email           text NOT NULL,
    phone           text,
    registered_at   timestamptz NOT NULL,
    attended        boolean NOT NULL
);

-- Business partners: their contact people (000 type (2)), data they entrust to us
-- (000 type (3)) and the members we refer to them (取次ぎ、媒介).
CREATE TABLE partners.companies (
    company_id  integer PRIMARY KEY,
    name        text NOT NULL,
    industry    text NOT NULL
);

CREATE TABLE partners.contacts (
    contact_id  bigint PRIMARY KEY,
    company_id  integer NOT NULL REFERENCES partners.companies,
    name        text NOT NULL,
    department  text,
    title       text,
    email       text NOT NULL,
    phone       text NOT NULL
);

CREATE TABLE partners.delivery_recipients (
    recipient_id  bigint PRIMARY KEY,
    company_id    integer NOT NULL REFERENCES partners.companies,
    name          text NOT NULL,
    email         text,
    postal_code   text,
    address       text
);

CREATE TABLE partners.referrals (
    referral_id  bigint PRIMARY KEY,
    member_id    bigint NOT NULL REFERENCES member.members,
    company_id   integer NOT NULL REFERENCES partners.companies,
    product      text NOT NULL,
    referred_at  timestamptz NOT NULL,
    status       text NOT NULL               -- referred | contracted | declined
);

-- Prize winners and the data their tax processing needs (賞金等の税務処理).
CREATE TABLE prizes.winners (
    winner_id          bigint PRIMARY KEY,
    member_id          bigint NOT NULL REFERENCES member.members,
    campaign           text NOT NULL,
    prize              text NOT NULL,
    prize_value        integer NOT NULL,
    won_at             timestamptz NOT NULL,
    legal_name         text NOT NULL,
    tax_address        text NOT NULL,
    individual_number  text,                 -- My Number, for the payment record
    withholding_tax    integer NOT NULL
);

-- Specified user information of internet-access subscribers (004).
CREATE TABLE telecom.subscriptions (
    subscription_id  bigint PRIMARY KEY,
    member_id        bigint NOT NULL REFERENCES member.members,
    plan_id          integer NOT NULL REFERENCES service.plans,
    access_id        text NOT NULL UNIQUE,   -- PPPoE / authentication ID
    install_date     date,                   -- 工事日
    started_on       date NOT NULL,
    ended_on         date,
    status           text NOT NULL           -- active | suspended | ended
);

-- Access records: sessions and the addresses assigned.
CREATE TABLE telecom.access_sessions (
    session_id       bigint PRIMARY KEY,
    subscription_id  bigint NOT NULL REFERENCES telecom.subscriptions,
    member_id        bigint NOT NULL REFERENCES member.members,
    assigned_ip      inet NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    bytes_in         bigint NOT NULL,
    bytes_out        bigint NOT NULL
);

-- Communication logs: where subscribers' traffic went (secrecy of communications).
CREATE TABLE telecom.communication_logs (
    log_id           bigint PRIMARY KEY,
    subscription_id  bigint NOT NULL REFERENCES telecom.subscriptions,
    member_id        bigint NOT NULL REFERENCES member.members,
    occurred_at      timestamptz NOT NULL,
    src_ip           inet NOT NULL,
    dst_ip           inet NOT NULL,
    dst_port         integer NOT NULL,
    protocol         text NOT NULL,
    dns_query        text,
    bytes            bigint NOT NULL
);

-- Notices about fees, conditions, construction dates, suspension and termination (004 purpose 1).
CREATE TABLE telecom.notices (
    notice_id  bigint PRIMARY KEY,
    member_id  bigint NOT NULL REFERENCES member.members,
    kind       text NOT NULL,                -- fee_change | terms_change | construction_date | suspension | termination
    channel    text NOT NULL,                -- email | post | sms
    sent_at    timestamptz NOT NULL
);

-- Members' decisions to stop (or allow) a use of their data: the ISP notice's
-- stop-of-use request (利用停止). The latest row per member and purpose holds;
-- the proxy filters withdrawn members' rows under withdrawable purposes.
CREATE TABLE privacy.consents (
    member_id    bigint NOT NULL REFERENCES member.members,
    purpose      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('granted', 'withdrawn')),
    recorded_at  timestamptz NOT NULL
);
-- The consent filter looks up a subject's latest decision per purpose for each row it keeps.
CREATE INDEX consents_subject ON privacy.consents (member_id, purpose, recorded_at);
