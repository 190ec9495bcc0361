"""Where each scored module lives inside the per-model and per-run arrays.

All modules of a model are concatenated, in `model.named_modules()` order, into one
1-D array per kind: magnitudes and levels hold n_rows * n_cols entries per module
(row-major, out x in), norms hold n_cols entries. One array per run keeps zarr's
per-array overhead out of the ingest and lets any range be read chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Where one module lies in a model's concatenated arrays: its shape, block index, offset in the parameter arrays
    (|W|, level codes) and in the norm arrays."""
    module: str
    layer: int | None
    n_rows: int
    n_cols: int
    param_offset: int
    norm_offset: int

    @property
    def n_params(self) -> int:
        """Entries of the module's weight matrix (n_rows x n_cols)."""
        return self.n_rows * self.n_cols

    @property
    def params(self) -> slice:
        """The module's slice of the concatenated parameter arrays."""
        return slice(self.param_offset, self.param_offset + self.n_params)

    @property
    def norms(self) -> slice:
        """The module's slice of the concatenated norm arrays."""
        return slice(self.norm_offset, self.norm_offset + self.n_cols)


def layout(modules) -> list[Span]:
    """Spans for (name, layer, n_rows, n_cols) tuples, in the given order."""
    spans, params, norms = [], 0, 0
    for name, layer, rows, cols in modules:
        spans.append(Span(name, layer, rows, cols, params, norms))
        params += rows * cols
        norms += cols
    return spans


def total_params(spans: list[Span]) -> int:
    """Length of the concatenated parameter arrays of `spans` (in position order)."""
    return spans[-1].param_offset + spans[-1].n_params if spans else 0


def total_norms(spans: list[Span]) -> int:
    """Length of the concatenated norm arrays of `spans` (in position order)."""
    return spans[-1].norm_offset + spans[-1].n_cols if spans else 0


def read_spans(con, model: str) -> list[Span]:
    """The model's modules as Spans, in scored order, from the catalog behind `con`."""
    rows = con.execute(
        "SELECT module, layer, n_rows, n_cols, param_offset, norm_offset FROM modules "
        "WHERE model = ? ORDER BY position", [model]).fetchall()
    return [Span(*row) for row in rows]


def groups(spans: list[Span], budget: int = 1 << 24) -> list[list[Span]]:
    """Consecutive spans batched to about `budget` parameters, so reads cover whole chunks."""
    out, current, size = [], [], 0
    for span in spans:
        if current and size + span.n_params > budget:
            out.append(current)
            current, size = [], 0
        current.append(span)
        size += span.n_params
    if current:
        out.append(current)
    return out
