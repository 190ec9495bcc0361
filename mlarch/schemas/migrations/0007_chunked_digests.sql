-- mlarch catalog, schema version 7: content digests that hash on every core.
-- 'chunks': arrays.sha256 is a sha256 over the sha256 of each chunk's raw bytes
-- (mlarch.store.arrays.content_digest), what mlarch writes from this version on. NULL (every
-- array written before): the sha256 of the whole array's bytes, as before. Record digests
-- sealed earlier still verify: the column enters them only where it is set.
ALTER TABLE arrays ADD COLUMN sha256_scheme VARCHAR;
