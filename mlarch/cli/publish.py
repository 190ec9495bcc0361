"""`mlarch publish`: a shared read-only archive on S3 (mlarch.store.remote_catalog)."""

from __future__ import annotations

import click

from mlarch.cli.common import archive_of as _archive


@click.command(epilog="""\b
Examples:
  mlarch --archive arch publish s3://my-bucket/mlarch      # arrays already there (first ingest --arrays)
  mlarch --archive s3://my-bucket/mlarch compare --model llama --langs en,de   # anywhere, read-only
  mlarch --archive s3://my-bucket/mlarch sql "SELECT * FROM set_sizes"

\b
Readers fetch the catalog into $MLARCH_CACHE (again only when a newer one is published) and
read the arrays in place; commands that change an archive refuse an s3:// archive. Publish
again after every ingest, rm or gc that readers should see.""")
@click.argument("url")
@click.pass_context
def publish(ctx, url):
    """Upload a consistent snapshot of the catalog to URL, where the archive's arrays are."""
    info = _archive(ctx).publish(url)
    click.echo(f"Published {info['runs']} finished run(s) to {info['url']} (catalog {info['size']:,} bytes, "
               f"sha256 {info['sha256'][:12]}..., schema version {info['schema_version']})")
