-- mlarch catalog, schema version 2: content digests that make edits and damage loud.
-- Rows from version 1 keep NULL chunk digests (reads then check structure and presence
-- of chunks, `verify` the whole-array sha256); their record digests are computed when
-- this migration runs (mlarch.store.records.seal), vouching for the rows as they were.

-- sha256 of the stored zarr.json and of every stored chunk (index = chunk number).
ALTER TABLE arrays ADD COLUMN meta_sha256 VARCHAR;
ALTER TABLE arrays ADD COLUMN chunk_sha256 VARCHAR[];

-- sha256 over the canonical record of a finished run (row, provenance, drawn items, array
-- digests) and of a model (row, modules, magnitudes array): see mlarch.store.records.
ALTER TABLE runs ADD COLUMN record_sha256 VARCHAR;
ALTER TABLE models ADD COLUMN record_sha256 VARCHAR;
