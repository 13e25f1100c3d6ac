-- payra schema 1: certificates, tokens, revocations, client certificates, agreed limits, the
-- ledger's checkpoint, counters and the audit chain. Records are JSON (jsonb) with a version
-- field, as in the embedded store; the columns beside them are what queries select on.

CREATE TABLE tokens (
    hash         bytea  PRIMARY KEY,
    expires_at_s bigint NOT NULL,
    record       jsonb  NOT NULL
);
CREATE INDEX tokens_expiry ON tokens (expires_at_s);

CREATE TABLE certificates (
    serial      bytea  PRIMARY KEY,
    customer_id text   NOT NULL,
    device_id   text   NOT NULL,
    not_after_s bigint NOT NULL,
    -- The device key, uncompressed SEC1: one key is certified for one customer and device.
    public_key  bytea  NOT NULL,
    -- What the verification cache loads (CertificateSummary's binary form).
    summary     bytea  NOT NULL,
    record      jsonb  NOT NULL
);
CREATE INDEX certificates_by_customer ON certificates (customer_id, serial);
CREATE INDEX certificates_by_device ON certificates (device_id, serial);
CREATE INDEX certificates_expiry ON certificates (not_after_s);
CREATE INDEX certificates_by_key ON certificates (public_key);

-- Every revoked certificate, device and client alike: what the CRL lists.
CREATE TABLE revoked (
    serial bytea PRIMARY KEY,
    entry  jsonb NOT NULL
);

CREATE TABLE client_certificates (
    serial bytea PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE agreed_limits (
    customer_id text   PRIMARY KEY,
    limit_fen   bigint NOT NULL
);

-- The decision log's ledger checkpoint: per (customer, day, tier) bucket, the amount used.
CREATE TABLE ledger (
    bucket   bytea  PRIMARY KEY,
    day      text   NOT NULL,
    used_fen bigint NOT NULL
);
CREATE INDEX ledger_by_day ON ledger (day);

CREATE TABLE releases (
    decision_seq   bigint PRIMARY KEY,
    released_at_ms bigint NOT NULL
);

CREATE TABLE counters (
    name  text   PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters (name, value) VALUES
    ('crl_number', 0),
    ('ledger_through_seq', 0),
    ('ready_probe', 0);

-- The change chain: entry n's hash is SHA-256(hash(n-1) || JSON(body(n))).
CREATE TABLE audit (
    seq   bigint PRIMARY KEY,
    entry jsonb  NOT NULL
);

-- The chain's head, one row. Every audited write locks it last, so entries are numbered in
-- commit order across every payra process on this database.
CREATE TABLE audit_head (
    id   integer PRIMARY KEY CHECK (id = 1),
    seq  bigint  NOT NULL,
    hash bytea   NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
