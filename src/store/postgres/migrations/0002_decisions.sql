-- payra schema 2: verification decisions, nonce claims and the live daily ledger, shared by
-- every payra process on this database.

-- One hash chain of decisions per payra process start: a process appends to its own chain
-- only, so chains need no lock across processes.
CREATE TABLE decision_chains (
    id            bigserial PRIMARY KEY,
    started_at_ms bigint    NOT NULL,
    -- The chain's head: its last decision's number and hash (0 and zeros when empty).
    seq           bigint    NOT NULL DEFAULT 0,
    hash          bytea     NOT NULL DEFAULT decode(repeat('00', 32), 'hex')
);

-- Each decision: the exact JSON the chain hashes (record), and what releases look up.
-- hash(n) = SHA-256(hash(n-1) || record(n)) within a chain.
CREATE TABLE decisions (
    chain          bigint NOT NULL REFERENCES decision_chains (id),
    seq            bigint NOT NULL,
    evidence_id    text   NOT NULL UNIQUE,
    bucket         bytea,
    reserved_fen   bigint NOT NULL,
    released_at_ms bigint,
    record         text   NOT NULL,
    hash           bytea  NOT NULL,
    PRIMARY KEY (chain, seq)
);

-- A (device key, nonce) pair claimed by a verification, until it expires.
CREATE TABLE nonces (
    key           bytea  PRIMARY KEY,
    expires_at_ms bigint NOT NULL
);
CREATE INDEX nonces_expiry ON nonces (expires_at_ms);
