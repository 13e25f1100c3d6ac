-- payra schema 3: RA mode. What payra must bring to the upstream CA that issued a device
-- certificate, and how far it got: one row per serial, pending until the upstream confirms.
CREATE TABLE upstream_revocations (
    serial bytea PRIMARY KEY,
    -- The UpstreamRevocation record.
    entry  jsonb NOT NULL
);
