-- payra schema 4: narrow certificate rows. A verification that misses the cache reads a
-- certificate's summary (about 130 bytes); the JSON record beside it (about 1.5 KB with the
-- certificate in base64) stayed in the row, so each miss read a 2 KB row and the table's
-- working set was the whole record. Rows longer than 512 bytes now have the record moved to
-- the TOAST table (compressed), leaving rows of about 300 bytes; the columns a miss reads stay
-- in the row. Rows written before keep their form until they are updated (VACUUM FULL
-- rewrites them all, under an exclusive lock).
ALTER TABLE certificates SET (toast_tuple_target = 512);
ALTER TABLE certificates ALTER COLUMN summary SET STORAGE PLAIN;
ALTER TABLE certificates ALTER COLUMN public_key SET STORAGE PLAIN;
