"""Helpers shared by the CLI modules."""

from __future__ import annotations

import click


def archive_of(ctx: click.Context):
    """The archive of --archive for a command that reads one: a path without a catalog is
    an error (a typo must not create an empty archive, nor a lock file in a stray folder)."""
    from mlarch.archive import Archive
    from mlarch.store import catalog

    archive = Archive(ctx.obj["archive"])
    if not archive.catalog_path.exists():
        raise catalog.missing_archive(archive.root)
    return archive


def archive_to_fill(ctx: click.Context):
    """The archive of --archive for a command that creates it on first use (ingest, eval,
    demo, import-bundle): no catalog yet is fine."""
    from mlarch.archive import Archive

    return Archive(ctx.obj["archive"])


def csv_list(kind):
    """A click callback parsing a comma-separated option into a list of `kind` values (None stays None); an empty item
    or a value `kind` rejects is a BadParameter."""
    def parse(ctx, param, value):
        if value is None:
            return None
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}")
        try:
            return [kind(p) for p in parts]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None

    return parse
