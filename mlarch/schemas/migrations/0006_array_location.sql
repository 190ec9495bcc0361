-- mlarch catalog, schema version 6: where the archive's arrays live. No row (every archive
-- made before this version): in the archive folder's arrays.zarr. One row: the S3 prefix
-- (s3://BUCKET/PREFIX) that the archive's first ingest was given with --arrays; every later
-- command reads it from here, and an ingest given another one is refused.
CREATE TABLE array_location (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    url VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL
);
