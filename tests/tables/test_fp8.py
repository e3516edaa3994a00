"""fp8 table files: per-row-scaled float8 e4m3 rows that every tier, patch and overlay serves
dequantised; the encoding is a fixed point, so patches revert bit for bit; old readers refuse them."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from engram.cli.main import main
from engram.config import StorageConfig
from engram.model.table import engram_tables
from engram.patches.apply import apply_patch, apply_to_model, model_fingerprint, revert_patch, table_fingerprint
from engram.patches.overlay import stack_patches
from engram.patches.patchfile import make_patch, save_patch
from engram.tables import tablefile
from engram.tables.convert import convert_table
from engram.tables.process import ProcessStorage
from engram.tables.runtime import attach_tables, table_runtime
from engram.tables.tablefile import (
    TableFileError,
    fp8_decode,
    fp8_encode,
    open_table,
    read_header,
    read_layer,
    save_model_tables,
    write_table,
)
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, DIM = 700, 8


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: the per-row scale must follow each row
    return torch.randn(ROWS, DIM, generator=g) * torch.logspace(-4, 3, ROWS)[:, None]


def _write(path, table: torch.Tensor, dtype: str = "fp8"):
    return write_table(path, {3: table}, fingerprint="fp", head_sizes={3: (300, 400)}, dtype=dtype)


# ----------------------------------------------------------------------------- encoding
def test_round_trip_error_bound_and_fixed_point() -> None:
    v = _rows()
    v[5] = 0.0
    v[6] = -0.0
    v[7, 0] = 225 / 448  # rounds to 224: the largest stored value must still end up in (224, 448]
    rec = fp8_encode(v)
    assert rec.dtype == torch.uint8 and rec.shape == (ROWS, DIM + 4)
    d = fp8_decode(rec, DIM)
    scale = rec[:, DIM:].contiguous().view(torch.float32).reshape(-1)
    amax = v.abs().amax(dim=1)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 times the scale
    bound = v.abs() / 16 + (scale * 2.0 ** -10)[:, None]
    assert bool(((d - v).abs() <= bound).all())
    assert bool((scale[amax > 0] <= amax[amax > 0] / 224).all())  # the range is used: max in (224, 448]
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))  # powers of two
    assert torch.equal(fp8_encode(d), rec)  # encode(decode(r)) == r, bit for bit
    assert torch.equal(d[5], torch.zeros(DIM)) and torch.equal(d[6].view(torch.int32), v[6].view(torch.int32))
    rel = ((d - v).norm(dim=1) / amax.clamp_min(1e-30)).max()
    assert 0 < rel < 0.1


def test_fast_decode_equals_torch_float8_for_every_bit_pattern() -> None:
    bits = torch.arange(256, dtype=torch.uint8)
    finite = (bits & 0x7F) != 0x7F  # e4m3fn's two NaN patterns are never written
    rec = torch.cat([bits[finite][None, :], torch.tensor([1.0]).view(torch.uint8)[None, :]], dim=1)
    want = bits[finite].view(torch.float8_e4m3fn).float()
    assert torch.equal(fp8_decode(rec, int(finite.sum()))[0].view(torch.int32), want.view(torch.int32))


def test_non_finite_rows_are_refused() -> None:
    v = torch.ones(3, 4)
    v[2, 1] = float("inf")
    with pytest.raises(TableFileError, match="row 2 holds inf or NaN"):
        fp8_encode(v)


# ----------------------------------------------------------------------------- format
def test_header_bytes_and_version(tmp_path, monkeypatch) -> None:
    v = _rows()
    h8 = _write(tmp_path / "t8.engt", v)
    h32 = _write(tmp_path / "t32.engt", v, "fp32")
    assert h8.version == 2 and h32.version == 1  # plain files keep the version every reader knows
    assert h8.layer(3).nbytes == ROWS * (DIM + 4) and h8.row_bytes == DIM + 4
    assert (tmp_path / "t8.engt").read_bytes()[8:12] == (2).to_bytes(4, "little")
    assert torch.equal(read_layer(h8, 3), fp8_decode(fp8_encode(v), DIM))
    assert h8.summary()["dtype"] == "fp8"
    # a reader from before fp8 (format version 1) refuses the file with a clear message ...
    monkeypatch.setattr(tablefile, "FORMAT_VERSION", 1)
    with pytest.raises(TableFileError, match=r"version 2; this engram-lm reads versions 1\.\.1, upgrade"):
        read_header(tmp_path / "t8.engt")
    assert read_header(tmp_path / "t32.engt").dtype == "fp32"  # ... and still reads plain files
    monkeypatch.undo()
    # an fp8 dtype in a version-1 header, or another row layout, is refused, not misread
    raw = (tmp_path / "t8.engt").read_bytes()
    for old, new, msg in ((b'"version":2', b'"version":1', "needs version 2"),
                          (b'"scale_per":"row"', b'"scale_per":"blk"', "row layout")):
        assert old in raw
        bad = bytearray(raw.replace(old, new))
        n = int.from_bytes(bad[12:16], "little")
        bad[16:20] = tablefile.zlib.crc32(bytes(bad[24:24 + n])).to_bytes(4, "little")
        (tmp_path / "bad.engt").write_bytes(bytes(bad))
        with pytest.raises(TableFileError, match=msg):
            read_header(tmp_path / "bad.engt")


def test_convert_to_and_from_fp8(tmp_path) -> None:
    v = _rows(1)
    src = _write(tmp_path / "a.engt", v, "fp32")
    h8 = convert_table(src.path, tmp_path / "b.engt", "fp8")
    assert h8.dtype == "fp8" and (h8.data_bytes, src.data_bytes) == (ROWS * (DIM + 4), ROWS * DIM * 4)
    back = convert_table(h8.path, tmp_path / "c.engt", "fp32")  # dequantises
    assert torch.equal(read_layer(back, 3), fp8_decode(fp8_encode(v), DIM))
    again = convert_table(back.path, tmp_path / "d.engt", "fp8")  # fp8 -> fp32 -> fp8: same bytes
    assert again.layer(3).crc32 == h8.layer(3).crc32 and table_fingerprint(again) == table_fingerprint(h8)
    copy8 = convert_table(h8.path, tmp_path / "e.engt")  # same dtype: records copied
    assert copy8.layer(3).crc32 == h8.layer(3).crc32


# ----------------------------------------------------------------------------- tiers
@pytest.mark.parametrize("threads", [1, 4])
def test_every_tier_serves_the_dequantised_rows(tmp_path, threads) -> None:
    v = _rows(2)
    header = _write(tmp_path / "t.engt", v)
    want = fp8_decode(fp8_encode(v), DIM)
    g = torch.Generator().manual_seed(threads)
    batches = [torch.randint(0, ROWS, (n,), generator=g) for n in (1, 50, 600, 1200, 3)]
    mm = MmapStorage(header, 3, io_threads=threads)
    tiers = [MemoryStorage(read_layer(header, 3)), mm,
             CachedStorage(MmapStorage(header, 3, io_threads=threads), 64, "lru"),
             CachedStorage(MmapStorage(header, 3), 300, "lfu")]
    if threads == 1:  # the helper process (the default for file tiers) once: it takes a while to start
        tiers.append(ProcessStorage(StorageConfig(path=str(header.path), kind="cached", cache_rows=100), header, 3))
    try:
        assert mm.row_bytes == DIM + 4 and tiers[2].pool.shape == (64, DIM + 4)  # the pool keeps records
        for rows in batches:
            for tier in tiers:
                for dtype in (torch.float32, torch.bfloat16):
                    out = torch.empty(rows.numel(), DIM, dtype=dtype)
                    tier.lookup(rows, out)
                    assert torch.equal(out, want[rows].to(dtype)), (type(tier).__name__, dtype)
        assert tiers[2].stats.hits > 0 and tiers[2].stats.bytes_read % (DIM + 4) == 0
    finally:
        for t in tiers:
            t.close()


# ----------------------------------------------------------------------------- patches and overlays

def test_patch_apply_revert_is_bit_exact_on_an_fp8_file(tmp_path, tiny) -> None:
    model = tiny.model(random_rows=True)
    table = tmp_path / "t.engt"
    header = save_model_tables(model, table, "fp8")
    original = table.read_bytes()
    base = {lid: read_layer(header, lid) for lid in header.layers}  # the dequantised rows
    lid = next(iter(base))
    new = {k: t.clone() for k, t in base.items()}
    rows = [0, 1, 2, 777, 4037]
    new[lid][rows] += torch.linspace(-1.3, 2.1, len(rows))[:, None]
    p = make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                   dtype="fp8")
    assert p.meta["base_fingerprint"] == table_fingerprint(header)  # in-memory copy = the file
    assert p.layers[lid].new.dtype == torch.float32  # new rows at full precision
    path = save_patch(p, tmp_path / "a.engp")
    apply_patch(table, path)
    after = read_header(table)
    assert table_fingerprint(after) == p.meta["result_fingerprint"]
    got = read_layer(after, lid)
    assert torch.equal(got[rows], fp8_decode(fp8_encode(new[lid][rows]), got.shape[1]))  # stored as fp8
    untouched = torch.ones(got.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(got[untouched], base[lid][untouched])  # other rows not re-quantised
    revert_patch(table, path)
    assert table.read_bytes() == original  # bit for bit, header included


def test_overlay_over_served_fp8_rows_keeps_new_rows_at_full_precision(tmp_path, tiny) -> None:
    model = tiny.model(random_rows=True)
    table = tmp_path / "t.engt"
    header = save_model_tables(model, table, "fp8")
    ref = copy.deepcopy(model)  # in-memory model holding the dequantised rows
    for lid, t in engram_tables(ref).items():
        t.load_full(read_layer(header, lid))
    base = {lid: read_layer(header, lid) for lid in header.layers}
    lid = next(iter(base))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    e = model.engram_layers[0]
    touched = torch.unique(e.multi_head_embedding.rows(model.compute_hash_ids(ids)[e.layer_id]))[::3]
    new = {k: t.clone() for k, t in base.items()}
    new[lid][touched] += 0.123456  # not representable in fp8: shows if anything re-quantises it
    p = make_patch(base, new, hash_fingerprint=model.hasher.fingerprint(), hasher=model.hasher.describe(),
                   dtype="fp8")
    assert model_fingerprint(ref, "fp8") == table_fingerprint(header)
    apply_to_model(ref, p)  # the in-memory tables take the fp32 new rows
    want = ref(ids).logits
    before = table.read_bytes()
    for kind in ("mmap", "cached"):
        served = copy.deepcopy(model)
        cfg = StorageConfig(path=str(table), kind=kind, cache_rows=16, process=False, io_threads=2)
        h = open_table(table, served.hasher, served.cfg.engram.head_dim)
        from engram.tables.process import open_layer_storage

        attach_tables(served, {l: open_layer_storage(cfg, h, l) for l in engram_tables(served)}, prefetch=True)
        try:
            stack = stack_patches(served, [p], table_file=table)
            assert torch.equal(served(ids, patches=[stack]).logits, want), kind
            assert not torch.equal(served(ids).logits, want)
        finally:
            table_runtime(served).close()
    assert table.read_bytes() == before  # the shared fp8 file was never written


# ----------------------------------------------------------------------------- CLI
def test_convert_cli_and_one_line_errors(tmp_path, capsys) -> None:
    src = _write(tmp_path / "a.engt", _rows(4), "fp32")
    assert main(["table", "convert", str(src.path), str(tmp_path / "b.engt"), "--dtype", "fp8", "--quiet"]) == 0
    assert "fp8" in capsys.readouterr().out
    assert main(["table", "inspect", str(tmp_path / "b.engt"), "--verify", "--json"]) == 0
    info = tablefile.json.loads(capsys.readouterr().out)
    assert info["dtype"] == "fp8" and info["version"] == 2 and info["verified"] == {"3": True}
    # fp8 where it does not apply: writing a checkpoint (its tables are fp32)
    assert main(["table", "convert", str(tmp_path / "b.engt"), str(tmp_path / "run"), "--base",
                 str(tmp_path), "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "engram: error: --dtype fp8 does not apply when writing a checkpoint" in err
    bad = tmp_path / "inf.engt"
    v = _rows(5)
    v[9, 2] = float("nan")
    _write(bad, v, "fp32")
    assert main(["table", "convert", str(bad), str(tmp_path / "c.engt"), "--dtype", "fp8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 9 holds inf or NaN" in err
    assert not (tmp_path / "c.engt").exists() and not list(tmp_path.glob(".c.engt.tmp-*"))
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


# ----------------------------------------------------------------------------- the benchmark's pieces
def test_bench_pieces_and_page(tmp_path) -> None:
    from engram.bench.table_dtype import (
        amax_scale_rows,
        bytes_report,
        loss_summary,
        quantisation_error,
        table_dtype_page,
        tier_rows_per_s,
    )

    v = _rows(6)
    files = {dt: _write(tmp_path / f"{dt}.engt", v, dt) for dt in ("fp32", "bf16", "fp8")}
    err = quantisation_error(files)
    assert 0 < err["bf16"] < err["fp8"] < 0.05 and 0 < err["fp8-amax"] < 0.05
    assert bool(((amax_scale_rows(v) - v).abs() <= v.abs() / 16 + v.abs().amax(1, keepdim=True) / 448 * 2 ** -9).all())
    b = bytes_report(files)
    assert b["dtypes"]["fp8"]["row_bytes"] == DIM + 4 and b["fp8_over_bf16"] == (DIM + 4) / (2 * DIM)
    losses = {"fp32": [2.0, 3.0, 4.0], "bf16": [2.1, 3.0, 4.2], "fp8": [2.2, 3.3, 4.2]}
    s = loss_summary(losses)
    d = s["minus_bf16"]["fp8"]
    assert s["batches"] == 3 and abs(d["mean"] - 0.4 / 3) < 1e-12 and abs(s["minus_fp32"]["bf16"]["mean"] - 0.1) < 1e-12
    t = tier_rows_per_s(files, ("memory", "mmap", "cached"), lookups=2, rows_per_lookup=64, repeats=3,
                        cache_fraction=0.25, seed=0)
    assert [len(x["fp8_over_bf16"]) for x in t["summary"].values()] == [3, 3, 3] and len(t["runs"]) == 18
    t["source"] = "demo"
    block = {"batch_size": 1, "seq_len": 4, "tokens_per_variant": 12, "eval_s": 1.0, "losses": losses,
             "summary": s, "quantisation_error": err, "bytes": b}
    r = {"date": "2026-12-07", "machine": "m", "config": {"repeats": 3},
         "platform": {"cpus": 2, "platform": "p", "python": "3", "torch": "2", "threads": 1},
         "demo": {"ckpt": "runs/x", "data": "d", "step": 5, **block}, "tiers": t}
    page = table_dtype_page(r, "engram bench table-dtype")
    assert f"{d['mean']:+.6f}" in page and f"{t['summary']['mmap']['fp8_over_bf16_median']:.2f}" in page
    assert "| demo (700 rows x 8) | fp8 | 12 |" in page
