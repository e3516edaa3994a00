"""A stack of patches read over a shared table per call: checked once, merged once, never written.

``model(ids, patches=[a, b])`` reads each patch's new rows instead of the table's at gather time
(``engram.model.table``); this module checks that a stack fits the table it is read over and
merges it into one overlay per layer, so that a server or a generation pays the checks once.

The stacking rule (the same content ``engram patch apply TABLE a b`` would leave)
    Patches are read in the order given. Each must have been made for the table's content (its
    base fingerprint is the table's) or for the content a patch listed before it leaves (its
    base is that patch's result fingerprint): a chain ``a -> b`` made with ``patch train
    --table`` stacks as ``[a, b]``, exactly as applying ``a`` then ``b`` to a copy of the table.
    Patches made independently on the same table also stack (``patch apply`` would refuse the
    second); on rows both touch **the later patch wins**, so a tenant's newer patch listed after
    its older one supersedes it there, and the older one's other rows still apply. A patch may
    appear once per stack, and all must be for the same table dtype.

The table's content fingerprint comes from a table file's header (free) or, for tables in
memory, from one CRC pass over them (``table_content_fingerprint``).

Shape legend
    K rows of one layer's overlay    Dh row width
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from engram.fsutil import PathLike
from engram.model.table import RowOverlay, merge_layer_overlays, overlay_nbytes
from engram.patches.apply import table_fingerprint
from engram.patches.patchfile import PatchChainError, PatchMismatchError, TablePatch, tables_fingerprint
from engram.tables.tablefile import read_header


def table_content_fingerprint(model: Any, dtype: str = "fp32", table_file: Optional[PathLike] = None) -> str:
    """The content fingerprint of the tables ``model`` reads (as the patches' base fingerprints).

    With ``table_file`` (the file the tables were loaded or are served from) its header's, free;
    otherwise every layer's rows CRC'd in ``dtype`` (one pass; rows widened from a ``dtype``
    file narrow back to the same bits, so a bf16 file read into fp32 memory still matches)."""
    if table_file is not None:
        return table_fingerprint(read_header(table_file))
    if getattr(model, "hasher", None) is None:
        raise PatchMismatchError("the model has no Engram layers, so there is no table to read patches over")
    tables = {e.layer_id: e.table.full() for e in model.engram_layers}
    return tables_fingerprint(tables, dtype, model.hasher.fingerprint())


class PatchStack:
    """Patches checked against one table's content (see the stacking rule) and merged into one
    overlay per layer; pass it as ``model(ids, patches=[stack])`` any number of times."""

    def __init__(self, patches: Sequence[TablePatch], base_fingerprint: str, hash_fingerprint: str) -> None:
        self.patches = list(patches)
        self.base_fingerprint, self.hash_fingerprint = base_fingerprint, hash_fingerprint
        check_stack(self.patches, base_fingerprint, hash_fingerprint)
        per_layer: dict[int, list[RowOverlay]] = {}
        for p in self.patches:
            for lid, ov in p.overlays().items():  # dequantised once, outside any model call
                per_layer.setdefault(lid, []).append(ov)
        self.overlays = {lid: merge_layer_overlays(stack) for lid, stack in per_layer.items()}

    @property
    def ids(self) -> list[str]:
        return [p.patch_id for p in self.patches]

    def nbytes(self) -> int:
        """Bytes of the merged overlay (row ids and values)."""
        return sum(overlay_nbytes(o) for o in self.overlays.values())

    def row_overlays(self, model: Any) -> dict[int, RowOverlay]:
        hasher = getattr(model, "hasher", None)
        if hasher is None or hasher.fingerprint() != self.hash_fingerprint:
            raise PatchMismatchError(f"this patch stack was checked against hash configuration "
                                     f"{self.hash_fingerprint[:16]}... but the model hashes with "
                                     f"{'nothing' if hasher is None else hasher.fingerprint()[:16] + '...'}; "
                                     f"stack the patches for this model with stack_patches(model, patches)")
        return self.overlays


def check_stack(patches: Sequence[TablePatch], base_fingerprint: str, hash_fingerprint: str) -> None:
    """Refuse a stack that breaks the stacking rule (module docstring); the message names the fix."""
    reachable = {base_fingerprint}
    seen: set[str] = set()
    dtypes = {p.dtype for p in patches}
    if len(dtypes) > 1:
        raise PatchMismatchError(f"the patches are for tables of different dtypes {sorted(dtypes)}; "
                                 f"stack patches made for one table")
    for i, p in enumerate(patches):
        if p.patch_id in seen:
            raise PatchChainError(f"patch {p.label()} is listed twice in the stack; list it once")
        seen.add(p.patch_id)
        if p.meta["hash_fingerprint"] != hash_fingerprint:
            raise PatchMismatchError(f"patch {p.label()} was made for hash configuration "
                                     f"{p.meta['hash_fingerprint'][:16]}... but the table hashes with "
                                     f"{hash_fingerprint[:16]}...; its row ids mean other N-grams there. "
                                     f"Retrain it with `engram patch train` on this model")
        base = p.meta["base_fingerprint"]
        if base not in reachable:
            hint = (f"list its parent patch {p.parent} before it" if p.parent and p.parent not in seen
                    else "retrain it on this table (`engram patch train --table`)")
            raise PatchMismatchError(f"patch {p.label()} (position {i} of the stack) was made for table content "
                                     f"{base[:16]}... but the table holds {base_fingerprint[:16]}... and no patch "
                                     f"before it leaves that content: {hint}")
        reachable.add(p.meta["result_fingerprint"])


def stack_patches(model: Any, patches: Sequence[TablePatch], *, base_fingerprint: Optional[str] = None,
                  table_file: Optional[PathLike] = None) -> PatchStack:
    """Check ``patches`` against the tables ``model`` reads and merge them (a :class:`PatchStack`).

    The tables' content fingerprint is ``base_fingerprint`` when given, else that of
    ``table_file`` or of the model's tables (:func:`table_content_fingerprint`)."""
    for p in patches:
        p.row_overlays(model)  # hash configuration and layer shapes against this model
    if base_fingerprint is None:
        dtype = patches[0].dtype if patches else "fp32"
        base_fingerprint = table_content_fingerprint(model, dtype, table_file)
    return PatchStack(patches, base_fingerprint, model.hasher.fingerprint())
