"""Apply, revert and list Engram table patches, on a table file or on a loaded model.

A patch (:mod:`engram.patches.patchfile`) names the table content it was made for (its base
fingerprint); applying it checks the target's hash configuration, dtype, layer shapes and
content, then writes the new rows; reverting writes the patch's stored old rows back, so
apply + revert restores the table bit for bit.

Table files (``.engt``)
    Apply and revert stream the whole table into a new file through
    :class:`~engram.tables.tablefile.TableWriter` (temp file, header last, fsync, ``os.replace``), so
    a reader sees the old table or the new one, never a mix, and a crash or ``kill -9``
    mid-apply leaves the old table in place (its temp file is swept by the next writer).
    Rewriting the whole file costs a sequential copy (seconds per GiB); in exchange it needs
    no journal and keeps every existing reader (mmap, the cached tier) valid on the old inode.
    While streaming, every touched row is checked against the patch's old values (on apply)
    or new values (on revert), each layer's bytes against its header CRC-32, and the new
    content against the patch's ``result_fingerprint``; any mismatch aborts before the commit.
    The applied chain is recorded in the header's ``meta["patches"]``: per patch its id,
    parent, name, base/result fingerprints, time and its row set (compact), which is what
    ``list`` shows and what ``revert`` checks.

Loaded models (``EngramLM`` with in-memory tables)
    :func:`apply_to_model` / :func:`revert_from_model` do the same on the table weights: each
    layer is patched in a copy that is then swapped in (one reference assignment), and the
    chain is kept on the model as ``model.engram_patches``. A *keyed* patch (entries keyed by
    N-gram, ``engram.patches.patchfile``) writes no row: applying it installs its entries on the
    layers (``MultiHeadEmbedding.installed``), reverting removes them; it never blocks, and is
    never blocked by, the revert of another patch. A table file cannot take a keyed patch.

The chain rule
    A patch applies only on top of the exact content it was made for (its base fingerprint;
    its parent must be applied, and nothing else since). A patch can be reverted when it is
    the top of the stack, or when no patch applied after it changed any of its rows (so its
    old values are still right underneath); otherwise the error names the blocking patch.
    After an out-of-order revert the table's content is a state no patch was made for, so new
    patches must be retrained on it (or the later ones reverted first).

The test hook ``ENGRAM_PATCH_PAUSE_S=<seconds>`` makes a table apply/revert print
``engram-patch: paused`` to stderr and sleep after its first written chunk (the crash tests
kill the process there).
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from engram.fsutil import PathLike
from engram.model.table import KeyedOverlay
from engram.patches.patchfile import (
    PatchChainError,
    PatchError,
    PatchMismatchError,
    TablePatch,
    content_fingerprint,
    decode_rows,
    encode_rows,
    load_patch,
    same_bits,
    tables_fingerprint,
)
from engram.tables.tablefile import (
    TableHeader,
    TableWriter,
    _hasher_diff,
    as_bytes,
    decode_records,
    encode_records,
    iter_layer_records,
    layer_crc32,
    read_header,
    value_dtype,
)

CHAIN_KEY = "patches"
MODEL_ATTR = "engram_patches"
PAUSE_ENV = "ENGRAM_PATCH_PAUSE_S"
CHUNK_ROWS = 1 << 18


# ----------------------------------------------------------------------------- checks shared by both targets
def _check_target(patch: TablePatch, where: str, hash_fp: str, hasher: Optional[Mapping[str, Any]],
                  dtype: str, shapes: Mapping[int, tuple[int, int]]) -> None:
    m = patch.meta
    if m["hash_fingerprint"] != hash_fp:
        # _hasher_diff words it "key: table A, model B"; here the sides are the patch and the target
        diff = _hasher_diff(m.get("hasher"), hasher).replace(": table ", ": patch ").replace(", model ", ", target ")
        raise PatchMismatchError(
            f"patch {patch.label()} was made for hash configuration {m['hash_fingerprint'][:16]}... but "
            f"{where} hashes with {hash_fp[:16]}...{' (' + diff + ')' if diff else ''}; "
            f"its row ids mean other N-grams there. Apply it to the table of the model it was trained "
            f"from, or retrain the patch with `engram patch train --ckpt RUN`")
    if m["dtype"] != dtype:
        raise PatchMismatchError(
            f"patch {patch.label()} was made for a {m['dtype']} table but {where} stores {dtype}; "
            f"apply it to the {m['dtype']} table, or retrain it with `engram patch train --table {where}`")
    for key, info in m["layers"].items():
        lid = int(key)
        if lid not in shapes:
            raise PatchMismatchError(f"patch {patch.label()} changes Engram layer {lid} but {where} has "
                                     f"layers {sorted(shapes)}; it belongs to another model")
        if tuple(shapes[lid]) != (int(info["rows"]), int(info["dim"])):
            raise PatchMismatchError(f"patch {patch.label()}: layer {lid} is {info['rows']} x {info['dim']} "
                                     f"in the patch but {shapes[lid][0]} x {shapes[lid][1]} in {where}; "
                                     f"it belongs to another model")


def _check_base(patch: TablePatch, where: str, current: str, chain: list[dict[str, Any]]) -> None:
    ids = [e["patch_id"] for e in chain]
    if patch.patch_id in ids:
        raise PatchChainError(f"patch {patch.label()} is already applied to {where} "
                              f"(chain: {_chain_text(chain)}); revert it first to re-apply")
    if current == patch.meta["base_fingerprint"]:
        return
    top = chain[-1]["patch_id"] if chain else None
    if patch.parent and patch.parent not in ids:
        hint = f"apply its parent patch {patch.parent} first"
    elif patch.parent != top:
        hint = (f"it was made on top of {patch.parent or 'the unpatched table'} but {where}'s top is "
                f"{top or 'the unpatched table'}; revert down to its parent or retrain it on this table")
    else:
        hint = ("the table's content differs from the one the patch was trained on (another "
                "checkpoint, a re-export, or an out-of-order revert); retrain the patch on this table "
                "with `engram patch train --table`")
    raise PatchMismatchError(f"patch {patch.label()} was made for table content "
                             f"{patch.meta['base_fingerprint'][:16]}... but {where} holds {current[:16]}...: {hint}")


def _chain_text(chain: list[dict[str, Any]]) -> str:
    return " -> ".join(e["patch_id"] + (f" ({e['name']})" if e.get("name") else "") for e in chain) or "empty"


def _revert_position(patch: TablePatch, where: str, chain: list[dict[str, Any]]) -> int:
    """Index of ``patch`` in ``chain`` after checking the chain rule (see the module docstring)."""
    ids = [e["patch_id"] for e in chain]
    if patch.patch_id not in ids:
        raise PatchChainError(f"patch {patch.label()} is not applied to {where} (chain: {_chain_text(chain)}); "
                              f"nothing to revert")
    i = ids.index(patch.patch_id)
    mine = {} if patch.keyed else {lid: lp.rows.numpy() for lid, lp in patch.layers.items()}
    for later in chain[i + 1:]:
        for key, text in later.get("rows", {}).items():
            lid = int(key)
            if lid in mine and np.intersect1d(mine[lid], decode_rows(text), assume_unique=True).size:
                raise PatchChainError(
                    f"cannot revert {patch.label()} from {where}: patch {later['patch_id']}"
                    f"{' (' + later['name'] + ')' if later.get('name') else ''}, applied after it, changed "
                    f"some of the same rows (layer {lid}); revert {later['patch_id']} first")
    return i


def _chain_entry(patch: TablePatch) -> dict[str, Any]:
    return {"patch_id": patch.patch_id, "parent": patch.parent, "name": patch.name,
            "base_fingerprint": patch.meta["base_fingerprint"],
            "result_fingerprint": patch.meta["result_fingerprint"],
            "changed_rows": patch.changed_rows,
            "applied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "file": str(patch.path) if patch.path is not None else None,
            # a keyed patch writes no row, so it blocks no other patch's revert
            "rows": {} if patch.keyed else {str(lid): encode_rows(lp.rows) for lid, lp in patch.layers.items()}}


def _as_patch(patch: Union[TablePatch, PathLike]) -> TablePatch:
    return patch if isinstance(patch, TablePatch) else load_patch(patch)


# ----------------------------------------------------------------------------- table files
def table_fingerprint(header: TableHeader) -> str:
    """Content fingerprint of a table file (from the header's CRCs; a layer without one is read)."""
    layers = {}
    for lid, info in header.layers.items():
        crc = info.crc32 if info.crc32 is not None else layer_crc32(header, lid)
        layers[lid] = (info.rows, info.dim, crc)
    return content_fingerprint(header.fingerprint, header.dtype, layers)


def table_chain(header: TableHeader) -> list[dict[str, Any]]:
    chain = header.meta.get(CHAIN_KEY) or []
    if not isinstance(chain, list) or not all(isinstance(e, dict) and "patch_id" in e for e in chain):
        raise PatchError(f"{header.path}: meta[{CHAIN_KEY!r}] is not a patch chain; the header was edited "
                         f"by hand, restore the table")
    return list(chain)


def _with_chain(meta: Mapping[str, Any], chain: list[dict[str, Any]]) -> dict[str, Any]:
    # An empty chain leaves no key, so apply + revert gives back the original file byte for byte.
    out = {k: v for k, v in meta.items() if k != CHAIN_KEY}
    if chain:
        out[CHAIN_KEY] = chain
    return out


def _shapes(header: TableHeader) -> dict[int, tuple[int, int]]:
    return {lid: (l.rows, l.dim) for lid, l in header.layers.items()}


def list_patches(table: PathLike) -> dict[str, Any]:
    """The applied chain of a table file, bottom first, and its current content fingerprint."""
    header = read_header(table)
    chain = table_chain(header)
    return {"table": str(header.path), "fingerprint": table_fingerprint(header),
            "hash_fingerprint": header.fingerprint, "dtype": header.dtype,
            "patches": [{k: v for k, v in e.items() if k != "rows"} for e in chain]}


def _open_for(table: PathLike, patch: Union[TablePatch, PathLike]
              ) -> tuple[TablePatch, TableHeader, str, list[dict[str, Any]]]:
    """Load the patch and the table's header, check they are for the same hashing, dtype and
    shapes; returns (patch, header, the table's path as text, its applied chain)."""
    patch = _as_patch(patch)
    header = read_header(table)
    where = str(header.path)
    if patch.keyed:
        raise PatchError(f"patch {patch.label()} is keyed (its entries apply only at the N-grams it was trained on), "
                         f"so it cannot be written into table file {where}; serve it per request "
                         f"(engram generate --patch, engram serve) or apply it to a loaded model")
    _check_target(patch, where, header.fingerprint, header.hasher, header.dtype, _shapes(header))
    return patch, header, where, table_chain(header)


def apply_patch(table: PathLike, patch: Union[TablePatch, PathLike], *, chunk_rows: int = CHUNK_ROWS,
                progress: bool = False) -> dict[str, Any]:
    """Apply ``patch`` to table file ``table`` atomically; returns a report (rows, seconds)."""
    t0 = time.perf_counter()
    patch, header, where, chain = _open_for(table, patch)
    _check_base(patch, where, table_fingerprint(header), chain)
    new_chain = chain + [_chain_entry(patch)]
    tdt = header.torch_dtype
    targets = {lid: (lp.rows, lp.old, lp.new_values(tdt)) for lid, lp in patch.layers.items()}
    fp = _rewrite(header, targets, _with_chain(header.meta, new_chain), patch.label(), "apply",
                  patch.meta["result_fingerprint"], chunk_rows, progress)
    return {"table": where, "patch_id": patch.patch_id, "changed_rows": patch.changed_rows,
            "fingerprint": fp, "chain": [e["patch_id"] for e in new_chain],
            "seconds": time.perf_counter() - t0}


def revert_patch(table: PathLike, patch: Union[TablePatch, PathLike], *, chunk_rows: int = CHUNK_ROWS,
                 progress: bool = False) -> dict[str, Any]:
    """Write ``patch``'s old rows back into ``table`` atomically (chain rule in the module docstring)."""
    t0 = time.perf_counter()
    patch, header, where, chain = _open_for(table, patch)
    i = _revert_position(patch, where, chain)
    # Only when the table still holds exactly this patch's result is the reverted content known
    # in advance (its base); after an out-of-order revert the touched rows are still checked.
    expect = (patch.meta["base_fingerprint"] if table_fingerprint(header) == chain[i]["result_fingerprint"]
              else None)
    tdt = header.torch_dtype
    # what the apply wrote (an fp8 file holds the new rows as fp8; other dtypes: the values)
    targets = {lid: (lp.rows, decode_records(encode_records(lp.new_values(tdt), header.dtype), header.dtype,
                                             lp.dim), lp.old) for lid, lp in patch.layers.items()}
    new_chain = chain[:i] + chain[i + 1:]
    fp = _rewrite(header, targets, _with_chain(header.meta, new_chain), patch.label(), "revert",
                  expect, chunk_rows, progress)
    return {"table": where, "patch_id": patch.patch_id, "changed_rows": patch.changed_rows,
            "fingerprint": fp, "chain": [e["patch_id"] for e in new_chain], "out_of_order": i != len(chain) - 1,
            "seconds": time.perf_counter() - t0}


def _rewrite(header: TableHeader, targets: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             meta: Mapping[str, Any], label: str, verb: str, expect_fp: Optional[str],
             chunk_rows: int, progress: bool = False) -> str:
    """Copy the table into a new file with ``targets[lid] = (rows, expected now, new)`` written.

    Aborts (the old file stays) unless every touched row holds its expected bits, every layer
    matches its header CRC, and the new content equals ``expect_fp`` (when given).
    """
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    where = header.path
    specs = [(l.layer_id, l.rows, l.head_sizes) for l in header.layers.values()]
    new_crcs: dict[int, tuple[int, int, int]] = {}
    first = True
    with TableWriter(header.path, specs, header.dim, header.dtype, fingerprint=header.fingerprint,
                     hasher=header.hasher, meta=meta) as w, \
            tqdm(total=header.rows, desc=f"{verb} {header.path.name}", unit="row", unit_scale=True,
                 disable=not progress, leave=False) as bar:
        for lid, info in header.layers.items():
            rows, expected, values = targets.get(lid, (None, None, None))
            old_crc, new_crc = 0, 0
            # The stored records are copied as they are; only touched rows are decoded and
            # encoded, so an fp8 table's other rows are never re-quantised.
            for start, chunk in iter_layer_records(header, lid, chunk_rows):
                old_crc = zlib.crc32(as_bytes(chunk), old_crc)
                if rows is not None:
                    n = chunk.shape[0]
                    lo, hi = np.searchsorted(rows.numpy(), [start, start + n])
                    if hi > lo:
                        local = rows[lo:hi] - start
                        now = decode_records(chunk[local], header.dtype, info.dim)
                        if not same_bits(now.contiguous(), expected[lo:hi].contiguous()):
                            raise PatchMismatchError(
                                f"cannot {verb} {label} on {where}: layer {lid} rows near {int(rows[lo])} do "
                                f"not hold the values the patch expects; the table was changed outside "
                                f"the patch chain. Nothing was written; restore the table")
                        chunk[local] = encode_records(values[lo:hi], header.dtype)
                new_crc = zlib.crc32(as_bytes(chunk), new_crc)
                w.write_records(lid, start, chunk)
                bar.update(chunk.shape[0])
                if first and pause > 0:
                    first = False
                    print("engram-patch: paused", file=sys.stderr, flush=True)
                    time.sleep(pause)
            if info.crc32 is not None and old_crc != info.crc32:
                raise PatchError(f"cannot {verb} {label}: {where} layer {lid} data checksum mismatch "
                                 f"(stored {info.crc32:#010x}, read {old_crc:#010x}); the table is damaged, "
                                 f"restore it. Nothing was written")
            new_crcs[lid] = (info.rows, info.dim, new_crc)
        fp = content_fingerprint(header.fingerprint, header.dtype, new_crcs)
        if expect_fp is not None and fp != expect_fp:
            raise PatchMismatchError(f"cannot {verb} {label} on {where}: the result would have content "
                                     f"{fp[:16]}... instead of {expect_fp[:16]}...; nothing was written")
    return fp


def apply_patches(table: PathLike, patches: Iterable[Union[TablePatch, PathLike]], **kw) -> list[dict[str, Any]]:
    """Apply several patches in order (each one atomically)."""
    return [apply_patch(table, p, **kw) for p in patches]


# ----------------------------------------------------------------------------- loaded models
def _model_tables(model: Any) -> dict[int, torch.nn.Parameter]:
    if getattr(model, "hasher", None) is None:
        raise PatchError("the model has no Engram layers, so there is no table to patch")
    out = {}
    for e in model.engram_layers:
        w = e.table.weight
        if w.is_meta:
            raise PatchError("the model's tables are offloaded to a table file; patch the file "
                             "(`engram patch apply TABLE PATCH`) instead of the model")
        out[e.layer_id] = w
    return out


def model_patches(model: Any) -> list[dict[str, Any]]:
    """The chain applied to a loaded model (bottom first)."""
    return [{k: v for k, v in e.items() if k != "rows"} for e in getattr(model, MODEL_ATTR, [])]


def model_fingerprint(model: Any, dtype: str = "fp32") -> str:
    tables = _model_tables(model)
    return tables_fingerprint({k: v.detach() for k, v in tables.items()}, dtype, model.hasher.fingerprint())


def _model_check(model: Any, patch: TablePatch) -> dict[int, torch.nn.Parameter]:
    tables = _model_tables(model)
    dt = {w.dtype for w in tables.values()}
    wdt = dt.pop()
    # An fp32 model patched with bf16-made rows would hold bf16 values afterwards and a revert
    # could not give its fp32 bits back; the dtypes must agree for bit-exact revert.
    if value_dtype(patch.dtype) != wdt:
        raise PatchMismatchError(f"patch {patch.label()} was made for a {patch.dtype} table but the "
                                 f"model's tables are {wdt}; apply it to the {patch.dtype} table file "
                                 f"or retrain it on this model")
    _check_target(patch, "the model", model.hasher.fingerprint(), model.hasher.describe(), patch.dtype,
                  {lid: tuple(w.shape) for lid, w in tables.items()})
    return tables


def _swap_rows(tables: Mapping[int, torch.nn.Parameter], patch: TablePatch, verb: str,
               forward: bool) -> None:
    staged = {}
    for lid, lp in patch.layers.items():
        w = tables[lid]
        expected, values = (lp.old, lp.new_values(w.dtype)) if forward else (lp.new_values(w.dtype), lp.old)
        rows = lp.rows.to(w.device)
        if not same_bits(w.detach()[rows].cpu().contiguous(), expected.contiguous()):
            raise PatchMismatchError(f"cannot {verb} {patch.label()} on the model: layer {lid} rows do not "
                                     f"hold the values the patch expects (the tables were trained or "
                                     f"edited outside the chain); nothing was changed")
        copy = w.detach().clone()
        copy[rows] = values.to(w.device)
        staged[lid] = copy
    with torch.no_grad():
        for lid, copy in staged.items():
            tables[lid].data = copy  # one reference swap per layer: readers see old or new rows


def _install(model: Any, patch: TablePatch, tables: Mapping[int, torch.nn.Parameter], remove: bool = False) -> None:
    """Install a keyed patch's entries on the model's layers (or remove them), in chain order."""
    holders = {e.layer_id: e.multi_head_embedding for e in model.engram_layers}
    for lid, ov in patch.overlays().items():
        mhe = holders[lid]
        rest = [(pid, o) for pid, o in mhe.installed if pid != patch.patch_id]
        dev = tables[lid].device
        mhe.set_installed(rest if remove else rest + [(patch.patch_id, KeyedOverlay(ov.keys.to(dev), ov.values.to(dev)))])


def apply_to_model(model: Any, patch: Union[TablePatch, PathLike]) -> dict[str, Any]:
    """Apply ``patch`` to a loaded model's in-memory tables (checked like a table file)."""
    t0 = time.perf_counter()
    patch = _as_patch(patch)
    tables = _model_check(model, patch)
    chain = getattr(model, MODEL_ATTR, [])
    _check_base(patch, "the model", model_fingerprint(model, patch.dtype), chain)
    if patch.keyed:
        _install(model, patch, tables)
    else:
        _swap_rows(tables, patch, "apply", forward=True)
    setattr(model, MODEL_ATTR, chain + [_chain_entry(patch)])
    return {"patch_id": patch.patch_id, "changed_rows": patch.changed_rows,
            "seconds": time.perf_counter() - t0}


def revert_from_model(model: Any, patch: Union[TablePatch, PathLike]) -> dict[str, Any]:
    """Write ``patch``'s old rows back into a loaded model (same chain rule as table files)."""
    t0 = time.perf_counter()
    patch = _as_patch(patch)
    tables = _model_check(model, patch)
    chain = getattr(model, MODEL_ATTR, [])
    i = _revert_position(patch, "the model", chain)
    if patch.keyed:
        _install(model, patch, tables, remove=True)
    else:
        _swap_rows(tables, patch, "revert", forward=False)
    setattr(model, MODEL_ATTR, chain[:i] + chain[i + 1:])
    return {"patch_id": patch.patch_id, "changed_rows": patch.changed_rows,
            "out_of_order": i != len(chain) - 1, "seconds": time.perf_counter() - t0}
