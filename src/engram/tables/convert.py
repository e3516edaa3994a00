"""Moving Engram tables between checkpoints and table files (``engram table convert``).

- checkpoint -> table file: the tables are streamed out of ``model.safetensors`` in chunks
  (a table larger than RAM never has to be loaded), in the chosen storage dtype, with the
  checkpoint's hash fingerprint.
- table file -> checkpoint: a base run's model with its tables replaced by the file's rows,
  saved as a new weights-only checkpoint (the base run is not modified).
- table file -> table file: re-encode (e.g. fp32 -> bf16 halves the bytes per row, fp8 about
  quarters them: Dh + 4 bytes per row with its scale). From fp8 the rows are dequantised; to
  the same dtype the stored bytes are copied as they are.

Every direction checks the hash fingerprint first and writes atomically (``tablefile``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open
from tqdm.auto import tqdm

from engram.fsutil import PathLike
from engram.model import checkpoint as ckpt
from engram.tables.runtime import _table_keys, build_model_without_tables, load_tables_into
from engram.tables.tablefile import (
    TableFileError,
    TableHeader,
    TableWriter,
    dtype_from_name,
    iter_layer_chunks,
    iter_layer_records,
    open_table,
    read_header,
)

CHUNK_ROWS = 1 << 18


def export_checkpoint_tables(run_dir: PathLike, out: PathLike, dtype: str = "fp32",
                             progress: bool = False) -> TableHeader:
    """Write the Engram tables of checkpoint ``run_dir`` to table file ``out``."""
    dtype_from_name(dtype)  # an unknown dtype fails before anything is read
    meta = ckpt.read_config(run_dir)
    if meta.model_config.engram is None:
        raise TableFileError(f"{run_dir} has no Engram layers, so it has no tables to export")
    # A table-less model gives the hasher, head sizes and state-dict keys without allocating tables.
    model = build_model_without_tables(meta.model_config, ckpt.load_compression_file(meta.run_dir, meta))
    ckpt.check_hash_fingerprint(model, meta)
    keys = _table_keys(model)
    path = meta.path(ckpt.MODEL_FILE)
    ckpt._verify_file(path, meta.files)
    hasher = model.hasher
    dim = meta.model_config.engram.head_dim
    specs = [(lid, sum(hasher.head_sizes(lid)), hasher.head_sizes(lid)) for lid in keys.values()]
    total = sum(s[1] for s in specs)
    with _table_source(meta, path) as f:
        names = set(f.keys())
        for key, lid in keys.items():
            if key not in names:
                raise TableFileError(f"{path} has no tensor {key!r} for layer {lid}; the checkpoint "
                                     f"was saved without its tables (export them from where they live)")
        with TableWriter(out, specs, dim, dtype, fingerprint=hasher.fingerprint(), hasher=hasher.describe(),
                         meta={"source": str(meta.run_dir), "step": meta.step}) as w, \
                tqdm(total=total, desc=f"export {Path(out).name}", unit="row", unit_scale=True,
                     disable=not progress, leave=False) as bar:
            for key, lid in keys.items():
                sl = f.get_slice(key)
                rows, width = sl.get_shape()
                if (rows, width) != (sum(hasher.head_sizes(lid)), dim):
                    raise TableFileError(f"{path}: {key} is {rows} x {width}, the config needs "
                                         f"{sum(hasher.head_sizes(lid))} x {dim}; re-save the checkpoint")
                for start in range(0, rows, CHUNK_ROWS):
                    chunk = sl[start:min(rows, start + CHUNK_ROWS)]
                    w.write(lid, start, chunk)
                    bar.update(chunk.shape[0])
    return read_header(out)


class _GatheredTables:
    """The tables of a sharded checkpoint, gathered from the rank shards, read like ``safe_open``."""

    class _Slice:
        def __init__(self, t: Any):
            self.t = t

        def get_shape(self) -> list[int]:
            return list(self.t.shape)

        def __getitem__(self, index: slice) -> Any:
            return self.t[index]

    def __init__(self, meta: ckpt.CheckpointMeta):
        self.tensors = {k: v for k, v in ckpt.read_table_state(meta).items() if k.endswith(ckpt.TABLE_KEY_SUFFIX)}

    def __enter__(self) -> "_GatheredTables":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tensors = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_slice(self, key: str) -> "_GatheredTables._Slice":
        return self._Slice(self.tensors[key])


def _table_source(meta: ckpt.CheckpointMeta, path: Path) -> Any:
    # A one-process checkpoint is streamed in chunks; the rows of a sharded one are interleaved
    # over its shard files (row g in shard g % W), so they are gathered into memory first.
    return _GatheredTables(meta) if meta.sharded else safe_open(str(path), framework="pt")


def import_table_into_checkpoint(table: PathLike, base_run: PathLike, out_run: PathLike,
                                 progress: bool = False) -> dict[str, Any]:
    """Save ``base_run``'s model with its tables taken from ``table`` as a new checkpoint ``out_run``."""
    base, dst = Path(base_run).resolve(), Path(out_run).resolve()
    if base == dst:
        raise TableFileError(f"--out {out_run} is the base run itself; write the new checkpoint to a "
                             f"new directory (the base run keeps its optimizer state and tables)")
    if (dst / ckpt.CONFIG_FILE).exists():
        raise TableFileError(f"{out_run} already holds a checkpoint; pick a new directory")
    model, meta = ckpt.load_model(base_run)
    header = load_tables_into(model, table, progress=progress)
    tok = meta.run_dir / ckpt.TOKENIZER_FILE
    ckpt.save_checkpoint(dst, model, None, None, meta.train_config, tok if tok.is_file() else None,
                         tokenizer_fingerprint=meta.tokenizer_fingerprint)
    return {"checkpoint": str(dst), "base": str(base), "table": str(header.path), "dtype": header.dtype,
            "rows": header.rows}


def convert_table(src: PathLike, dst: PathLike, dtype: Optional[str] = None,
                  progress: bool = False) -> TableHeader:
    """Re-encode a table file (e.g. to bf16); same fingerprint and layers."""
    if Path(src).resolve() == Path(dst).resolve():
        raise TableFileError(f"source and destination are both {src}; write to a new file")
    h = open_table(src)
    dtype = dtype or h.dtype
    dtype_from_name(dtype)
    same = dtype == h.dtype  # copy the stored rows; re-encoding fp8 would give the same bytes, slower
    specs = [(l.layer_id, l.rows, l.head_sizes) for l in h.layers.values()]
    with TableWriter(dst, specs, h.dim, dtype, fingerprint=h.fingerprint, hasher=h.hasher,
                     meta={**h.meta, "converted_from": str(h.path)}) as w, \
            tqdm(total=h.rows, desc=f"convert {Path(dst).name}", unit="row", unit_scale=True,
                 disable=not progress, leave=False) as bar:
        for lid in h.layers:
            if same:
                for start, rec in iter_layer_records(h, lid, CHUNK_ROWS):
                    w.write_records(lid, start, rec)
                    bar.update(rec.shape[0])
                continue
            for start, chunk in iter_layer_chunks(h, lid, CHUNK_ROWS):
                w.write(lid, start, chunk)
                bar.update(chunk.shape[0])
    return read_header(dst)
