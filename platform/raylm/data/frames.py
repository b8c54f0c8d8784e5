"""Ray Data and pandas at zero rows: frames and files that keep their columns when a (small) corpus leaves nothing.

The schema of something empty is lost in three places the curate stage relies on: Ray Data's `to_pandas()`
returns a frame with no columns at all (so `df["a"]` raised KeyError), its `write_parquet()` writes no file (so
the next pass, or a later stage, found no dataset), and pandas types a column assigned from an empty list as
float64. A tiny input file, or one whose every record is filtered or a duplicate, reaches all three.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa


def to_pandas(ds, columns: list[str]) -> pd.DataFrame:
    """`ds.to_pandas()` that has `columns` even when the dataset has no rows."""
    df = ds.to_pandas()
    return df if len(df.columns) else pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def write_parquet(ds, uri: str, schema: pa.Schema | None = None, empty=None, **kwargs) -> None:
    """`ds.write_parquet(uri)`, plus one empty file with `schema` (or `empty()`'s, computed only then) when Ray
    Data wrote none: every split a stage promises exists and can be read, with its columns, at zero rows."""
    import fsspec
    import pyarrow.parquet as pq

    ds.write_parquet(uri, **kwargs)
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path) and fs.ls(path, detail=False):  # Ray Data writes its files flat in `uri`
        return
    if schema is None:
        schema = empty()
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path.rstrip('/')}/empty-0.parquet", "wb") as f:
        pq.write_table(schema.empty_table(), f)


def with_types(table: pa.Table, types: dict[str, pa.DataType], default: pa.DataType = pa.large_string()
               ) -> pa.Schema:
    """`table`'s schema with each column pandas left untyped (null: an empty object column) given its real type."""
    return pa.schema([pa.field(f.name, types.get(f.name, default)) if pa.types.is_null(f.type) else f
                      for f in table.schema])


# A column assigned from a list (or an object array) of no rows is float64 or untyped in pandas, so an operator
# that saw an empty batch changed its columns' types (`drop_reason` became double, then `== ""` failed in Arrow).
# Operators build their columns with these: the dtype pandas infers when there are rows, and at zero rows too.
def strings(values, index) -> pd.Series:
    return pd.Series(values, index=index, dtype="str")


def ints(values, index) -> pd.Series:
    return pd.Series(values, index=index, dtype="int64")
