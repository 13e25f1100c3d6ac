-- payra schema 4: certificate summaries read from the primary key alone.
--
-- On PostgreSQL every verification reads its certificate's summary in its decision's
-- transaction (the revocation as committed), a verification cache miss reads it first, and
-- the count by status reads every one. The primary key now carries the summary and notAfter,
-- so these are index-only scans: about 190 bytes a certificate to keep in memory, against
-- the heap's 2 KB row with the JSON record. At 100M devices that is a 19 GB working set
-- instead of 200 GB, and the count reads a tenth of the bytes.
--
-- The rebuild holds an ACCESS EXCLUSIVE lock on the table until the migration commits: about
-- 0.9 s per million certificates on a 2-core machine (operations.md, "Upgrading a PostgreSQL
-- deployment to schemas 4 and 5").
ALTER TABLE certificates
    DROP CONSTRAINT certificates_pkey,
    ADD CONSTRAINT certificates_pkey PRIMARY KEY (serial) INCLUDE (not_after_s, summary);

-- An index-only scan reads the heap for pages the visibility map does not mark all-visible,
-- that is pages written since the last vacuum. PostgreSQL's default vacuums an insert-only
-- table after 20 % new rows (20M at 100M devices); vacuum it after 1 %.
ALTER TABLE certificates SET (autovacuum_vacuum_insert_scale_factor = 0.01);
