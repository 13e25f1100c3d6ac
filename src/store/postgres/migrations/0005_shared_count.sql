-- payra schema 5: the count by status, shared by the replicas.
--
-- Every replica publishes `payra_certificates` from a count of the certificates by status,
-- at start and every 5 minutes. At 100M certificates one count reads the whole primary key
-- (19 GB) and takes about 37 s of a PostgreSQL core. A replica now counts only when the
-- last count stored here is older than half its interval, under an advisory lock; one
-- replica counts and the others read its result.

-- The last count: one row per standing, as `Store::count_by_standing` groups them.
CREATE TABLE standing_counts (
    id            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason        integer,
    not_yet_valid boolean,
    expired       boolean NOT NULL,
    count         bigint  NOT NULL,
    version       integer NOT NULL
);

-- When it was counted (seconds since the epoch, by the counting replica's clock); 0: never.
INSERT INTO counters (name, value) VALUES ('standings_counted_at_s', 0);
