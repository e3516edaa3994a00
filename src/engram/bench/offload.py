"""``engram bench offload`` and ``engram bench large-table``: Engram tables outside RAM, measured.

``bench_offload`` runs one model on the same batches four ways, interleaved round by round in
one process so machine noise hits all of them alike:

    in_memory            the default: tables are ``nn.Embedding`` weights in RAM
    in_memory_prefetch   the same tables in RAM served through the prefetch runtime (its worker
                         thread included): isolates what the storage tier costs
    offload              tables in a table file behind a ``cached`` tier (LRU pool of
                         ``cache_rows`` rows per layer, the file >= 2x the pool), rows
                         prefetched one batch ahead
    no_prefetch          the same tier, rows fetched when the Engram layer asks for them

The forward is evaluation's (``model(x, y)`` under ``no_grad``, prefetch via
``TableRuntime.prefetch_batches`` exactly as ``evaluate`` does). Storage is cold: the file is
mapped with ``MADV_RANDOM`` and, after every read, its pages are dropped from the mapping
(``MADV_DONTNEED``) and from the page cache (``POSIX_FADV_DONTNEED``), so every cache miss is a
disk read. The pools start in steady state: they are first filled by replaying the row lookups
of the ``warm_batches`` batches that precede the timed ones in the stream (no forward; read
through the page cache because it is not timed, which is then dropped again), and the
no-prefetch pool gets a copy of the prefetch pool. Round 0 of the timed loop is not timed
either (allocators, threads). ``overhead = 1 - offload / in_memory``.

``bench_large_table`` writes a table bigger than this machine's RAM (32 GiB by default), serves
it from a cached tier for evaluation and generation, reports tokens/s and hit rates, and
deletes the file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from engram.config import ModelConfig, TrainConfig, preset
from engram.data.shards import get_batch, iter_eval_batches, load_dataset, prepare_builtin
from engram.model.generation import SamplingConfig, generate
from engram.model.lm import EngramLM
from engram.tables.process import open_layer_storage
from engram.tables.runtime import attach_tables, build_model_without_tables, table_runtime
from engram.tables.tablefile import TableWriter, open_table, save_model_tables
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage, StorageConfig
from engram.training.evaluation import evaluate
from engram.training.sparse_adam import clip_grad_norm_
from engram.training.trainer import _dataset_compression, build_optimizers

COLD_METHOD = ("mmap with MADV_RANDOM; after every read the layer's pages are dropped from the "
               "mapping (MADV_DONTNEED) and the page cache (POSIX_FADV_DONTNEED)")


def _prepare_data(data_dir: Optional[str], work: Path, progress: bool) -> Path:
    if data_dir is not None:
        return Path(data_dir)

    out = work / "data"
    prepare_builtin(str(out), tokenizer="bpe", vocab_size=4096, progress=progress)
    return out


def _compression(cfg: ModelConfig, data_dir: Path):
    return _dataset_compression(cfg, load_dataset(data_dir), data_dir)


def _set_cold(st: Any, cold: bool) -> None:
    """Switch a cached tier's file reads between cold (pages dropped after reads) and cached."""
    if hasattr(st, "set_cold"):  # served by a helper process
        st.set_cold(cold)
    elif isinstance(st, CachedStorage) and isinstance(st.backing, MmapStorage):
        st.backing.cold = cold
        if cold:
            st.backing.drop_page_cache()


def _read_through(path: Path, chunk: int = 64 << 20) -> None:
    """Read a file once so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def _pin_cpus(models: dict[str, torch.nn.Module]) -> Optional[dict[str, Any]]:
    """Model on the first CPU, everything that serves rows on the others; None on one CPU.

    The calling (main) thread runs the forwards. Every other thread of this process (the
    prefetch worker, I/O threads) and every thread of the fetch helper processes move to the
    remaining CPUs, so the scheduler never parks I/O work on the model's core or migrates the
    model between cores mid-forward. Linux affinity is per thread, hence the walk over tasks.
    """
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - not Linux
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    compute, serve = {cpus[0]}, set(cpus[1:])
    pids = [os.getpid()]
    for m in models.values():
        rt = table_runtime(m)
        for st in (rt.storages.values() if rt is not None else ()):
            proc = getattr(st, "_proc", None)  # engram.tables.process.ProcessStorage
            if proc is not None:
                pids.append(proc.pid)
    main = threading.get_native_id()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            tid = int(task.name)
            try:
                os.sched_setaffinity(tid, compute if tid == main else serve)
            except OSError:  # a thread that ended meanwhile
                pass
    return {"model_cpu": cpus[0], "serving_cpus": sorted(serve), "all": cpus}


def _unpin_cpus(pinned: Optional[dict[str, Any]]) -> None:
    if pinned is None:
        return
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), set(pinned["all"]))
        except OSError:
            pass


def bench_config(vocab_size: int, table_rows_per_order: int) -> ModelConfig:
    """The ``engram-moe`` preset with bigger tables (rows per head ~ ``table_rows_per_order``)."""
    cfg = preset("engram-moe", vocab_size)
    assert cfg.engram is not None
    eng = dataclasses.replace(cfg.engram, engram_vocab_size=(table_rows_per_order,) * len(cfg.engram.engram_vocab_size))
    return dataclasses.replace(cfg, engram=eng)


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def bench_offload(data_dir: Optional[str] = None, *, batch_size: int = 8, seq_len: int = 256,
                  rounds: int = 12, batches_per_round: int = 8, warm_batches: int = 200,
                  cache_rows: int = 1 << 20,
                  table_rows_per_order: int = 409_600, policy: str = "lru", io_threads: int = 16,
                  dtype: str = "fp32", cold: bool = True, workdir: Optional[str] = None,
                  threads: Optional[int] = 1, process: bool = True, pin: bool = True,
                  progress: bool = False, seed: int = 0) -> dict[str, Any]:
    """Tokens/s of the three modes (see the module docstring) and the offload overhead.

    ``threads`` sets torch's intra-op threads for the run (restored afterwards; None keeps
    torch's default, one per core). The default is 1: the model computes on one core and the
    prefetch and I/O threads have the other, as a GPU's host CPU would. It is also the setting
    that stays stable on a shared machine: with two OpenMP threads per team and other
    processes competing for the cores, a forward can slow down several-fold (measured here:
    0.34 s/batch with one thread vs 1.5-5.7 s with two under a load average of 9), and an
    extra Python thread that merely wakes up changes that (2.7x) - which would flatter the
    prefetching mode. ``--threads 2`` measures the all-cores setting.
    """
    if min(batch_size, seq_len, rounds, batches_per_round, cache_rows) < 1:
        raise ValueError("batch_size, seq_len, rounds, batches_per_round and cache_rows must be >= 1")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")

    t_setup = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="engram-bench-", dir=workdir))
    prev_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        data_path = _prepare_data(data_dir, tmp, progress)
        ds = load_dataset(data_path)
        cfg = bench_config(int(ds.meta["vocab_size"]), table_rows_per_order)
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        compression = _compression(cfg, data_path)
        torch.manual_seed(seed)
        mem = EngramLM(cfg, compression).eval()
        table_path = tmp / "bench.engt"
        save_model_tables(mem, table_path, dtype=dtype, progress=progress)
        header = open_table(table_path, mem.hasher, cfg.engram.head_dim)
        backbone = {k: v for k, v in mem.state_dict().items() if "multi_head_embedding.embedding" not in k}

        def offloaded(prefetch: bool, in_memory: bool = False) -> torch.nn.Module:
            m = build_model_without_tables(cfg, compression)
            m.load_state_dict(backbone, strict=False)
            if in_memory:  # the same runtime and worker thread, over mem's tables in RAM
                storages = {e.layer_id: MemoryStorage(e.multi_head_embedding.embedding.weight)
                            for e in mem.engram_layers}
            else:
                scfg = StorageConfig(path=str(table_path), kind="cached", cache_rows=cache_rows,
                                     cache_policy=policy, io_threads=io_threads, cold=cold, process=process)
                storages = {lid: open_layer_storage(scfg, header, lid) for lid in header.layers}
            attach_tables(m, storages, prefetch=prefetch)
            return m.eval()

        models = {"in_memory": mem, "in_memory_prefetch": offloaded(True, in_memory=True),
                  "offload": offloaded(True), "no_prefetch": offloaded(False)}
        need = warm_batches + (rounds + 1) * batches_per_round
        stream = iter_eval_batches(ds.train, batch_size, seq_len)
        batches = [b for _, b in zip(range(need), stream)]
        if len(batches) < need:
            raise ValueError(f"the dataset has only {len(batches)} batches of {batch_size} x {seq_len}; "
                             f"lower warm_batches, rounds or batches_per_round")
        warm, batches = batches[:warm_batches], batches[warm_batches:]
        # Steady state: both pools replay the row lookups of the stream's first `warm_batches`
        # batches (no forward; through the page cache, since this is not timed), then go cold.
        pf_rt, np_rt = table_runtime(models["offload"]), table_runtime(models["no_prefetch"])
        assert pf_rt is not None and np_rt is not None
        t_warm = time.perf_counter()
        for rt in (pf_rt, np_rt):
            for st in rt.storages.values():
                _set_cold(st, False)
        _read_through(table_path)
        for x, _ in tqdm(warm, desc="warm pools", disable=not progress, leave=False):
            hashed = mem.hasher.hash(x)
            for rt in (pf_rt, np_rt):
                for lid, ids in hashed.items():
                    rt._fetch(lid, ids)
        for rt in (pf_rt, np_rt):
            for st in rt.storages.values():
                _set_cold(st, cold)  # measured reads start cold (pages dropped)
        warm_s = time.perf_counter() - t_warm
        warm_hit_rate = pf_rt.stats()["hit_rate"]
        with torch.no_grad():  # same numbers from all four (checked bit for bit) on round 0's batch
            ref = mem(*batches[0]).logits
            equal = all(torch.equal(ref, m(*batches[0]).logits) for k, m in models.items() if k != "in_memory")
        for rt in (pf_rt, np_rt):
            rt.reset_stats()
        setup_s = time.perf_counter() - t_setup

        pinned = _pin_cpus(models) if pin else None
        times: dict[str, list[float]] = {k: [] for k in models}
        load_before = _loadavg()
        order = list(models)
        bar = tqdm(total=(rounds + 1) * len(models), desc="bench offload", disable=not progress, leave=False)
        for r in range(rounds + 1):
            chunk = batches[r * batches_per_round:(r + 1) * batches_per_round]
            for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                m = models[name]
                rt = table_runtime(m)
                it = rt.prefetch_batches(chunk) if rt is not None and rt.prefetch else iter(chunk)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for x, y in it:
                        m(x, y)
                dt = time.perf_counter() - t0
                if r == 0:  # warm-up round: fills the pools, not timed
                    if rt is not None:
                        rt.reset_stats()
                else:
                    times[name].append(dt)
                bar.update(1)
        bar.close()
        load_after = _loadavg()
        _unpin_cpus(pinned)

        tokens_per_round = batch_size * seq_len * batches_per_round
        tps = {k: tokens_per_round * len(v) / sum(v) for k, v in times.items()}
        per_round_overhead = [1 - a / b for a, b in zip(times["in_memory"], times["offload"])]
        pf, npf = table_runtime(models["offload"]), table_runtime(models["no_prefetch"])
        assert pf is not None and npf is not None
        st_pf, st_np = pf.stats(), npf.stats()
        file_bytes = header.file_bytes
        pool_bytes = len(header.layers) * CachedStorage.ram_bytes(cache_rows, header.dim, header.itemsize, policy)
        result = {
            "bench": "offload",
            "in_memory_tokens_per_s": tps["in_memory"],
            "offload_tokens_per_s": tps["offload"],
            "no_prefetch_tokens_per_s": tps["no_prefetch"],
            "overhead": 1 - tps["offload"] / tps["in_memory"],
            "in_memory_prefetch_tokens_per_s": tps["in_memory_prefetch"],
            "overhead_vs_in_memory_prefetch": 1 - tps["offload"] / tps["in_memory_prefetch"],
            "no_prefetch_overhead": 1 - tps["no_prefetch"] / tps["in_memory"],
            "prefetch_speedup": tps["offload"] / tps["no_prefetch"],
            "hit_rate": st_pf["hit_rate"],
            "overhead_per_round": per_round_overhead,
            "overhead_median_round": statistics.median(per_round_overhead),
            "outputs_equal": equal,
            "stall_s": {"offload": st_pf["stall_s"], "no_prefetch": st_np["stall_s"]},
            "timed_s": {k: sum(v) for k, v in times.items()},
            "misses": {"offload": st_pf["misses"], "no_prefetch": st_np["misses"]},
            "bytes_read": {"offload": sum(l["mmap"]["bytes_read"] for l in st_pf["layers"].values())},
            "table": {"file_bytes": file_bytes, "rows": header.rows, "dim": header.dim, "dtype": dtype,
                      "pool_rows_per_layer": cache_rows, "pool_bytes": pool_bytes,
                      "file_to_pool": file_bytes / pool_bytes, "policy": policy, "io_threads": io_threads,
                      "fetch_process": process},
            "cold_storage": COLD_METHOD if cold else "warm page cache (cold=False)",
            "batch_size": batch_size, "seq_len": seq_len, "rounds": rounds,
            "batches_per_round": batches_per_round, "warmup_rounds": 1,
            "warm_batches": warm_batches, "warm_tokens": warm_batches * batch_size * seq_len,
            "warm_s": warm_s, "warm_hit_rate": warm_hit_rate,
            "model": "engram-moe backbone, engram_vocab_size per order "
                     f"{table_rows_per_order}, {header.rows:,} table rows x {header.dim}",
            "torch_threads": torch.get_num_threads(), "cpu_pinning": pinned, "loadavg_before": load_before,
            "loadavg_after": load_after, "setup_s": setup_s,
        }
        for m in models.values():
            rt = table_runtime(m)
            if rt is not None:
                rt.close()
        return result
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- > RAM table
def _write_random_table(path: Path, model: torch.nn.Module, std: float, seed: int, chunk_rows: int,
                        progress: bool) -> None:
    """Every row random N(0, std^2), written in chunks (bounded memory, page cache kept clean)."""
    hasher = model.hasher
    dim = model.cfg.engram.head_dim
    specs = [(lid, sum(hasher.head_sizes(lid)), hasher.head_sizes(lid)) for lid in model.cfg.engram.layer_ids]
    gen = torch.Generator().manual_seed(seed)
    total = sum(s[1] for s in specs)
    with TableWriter(path, specs, dim, "fp32", fingerprint=hasher.fingerprint(), hasher=hasher.describe(),
                     meta={"note": "random rows for the larger-than-RAM benchmark"}, drop_cache=True) as w, \
            tqdm(total=total * dim * 4, desc=f"write {path.name}", unit="B", unit_scale=True,
                 disable=not progress) as bar:
        for lid, rows, _ in specs:
            for start in range(0, rows, chunk_rows):
                n = min(chunk_rows, rows - start)
                w.write(lid, start, torch.randn(n, dim, generator=gen) * std)
                bar.update(n * dim * 4)


def bench_large_table(data_dir: Optional[str] = None, *, size_gib: float = 32.0, cache_rows: int = 1 << 21,
                      policy: str = "lru", io_threads: int = 16, eval_batches: int = 20,
                      batch_size: int = 8, seq_len: int = 256, gen_tokens: int = 128,
                      workdir: Optional[str] = None, keep: bool = False, cold: bool = True,
                      threads: Optional[int] = 1, progress: bool = False, seed: int = 0) -> dict[str, Any]:
    """A table of ``size_gib`` on disk served from a cached tier: eval and generation tokens/s.

    ``threads``: torch intra-op threads for the run (restored afterwards; None = torch's default).
    """
    work = Path(workdir or tempfile.gettempdir()) / "engram-large-table"
    work.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        data_path = _prepare_data(data_dir, work, progress)
        ds = load_dataset(data_path)
        vocab = int(ds.meta["vocab_size"])
        base = preset("engram-moe", vocab)
        assert base.engram is not None
        row_bytes = base.engram.head_dim * 4
        heads = base.engram.num_heads_total
        per_head = int(size_gib * 2**30 / row_bytes / heads)
        cfg = bench_config(vocab, per_head)
        need = per_head * heads * row_bytes
        free = shutil.disk_usage(work).free
        if need > free * 0.9 and not (work / "large.engt").is_file():
            raise ValueError(f"a {size_gib:g} GiB table does not fit in the {free / 2**30:.1f} GiB free "
                             f"in {work}; pass a smaller size_gib or another workdir")
        compression = _compression(cfg, data_path)
        torch.manual_seed(seed)
        model = build_model_without_tables(cfg, compression).eval()
        table_path = work / "large.engt"
        t0 = time.perf_counter()
        try:  # a table kept by an earlier --keep run for this same configuration is reused
            header = open_table(table_path, model.hasher, cfg.engram.head_dim)
            write_s = None
        except (FileNotFoundError, ValueError):
            _write_random_table(table_path, model, cfg.engram.table_init_std, seed, 1 << 21, progress)
            write_s = time.perf_counter() - t0
            header = open_table(table_path, model.hasher, cfg.engram.head_dim)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

        def attach(prefetch: bool):
            storages = {lid: CachedStorage(MmapStorage(header, lid, io_threads=io_threads, cold=cold),
                                           cache_rows, policy) for lid in header.layers}
            return attach_tables(model, storages, prefetch=prefetch)

        out: dict[str, Any] = {
            "bench": "large_table", "file_bytes": header.file_bytes, "ram_bytes": ram,
            "file_to_ram": header.file_bytes / ram, "rows": header.rows, "dim": header.dim,
            "dtype": header.dtype, "write_s": write_s, "cache_rows_per_layer": cache_rows,
            "policy": policy, "io_threads": io_threads,
            "cold_storage": COLD_METHOD if cold else "warm page cache", "loadavg_before": _loadavg(),
        }
        for prefetch in (True, False):
            rt = attach(prefetch)
            t0 = time.perf_counter()
            ev = evaluate(model, ds.val, batch_size, seq_len, eval_batches)
            ev_s = time.perf_counter() - t0
            ev_stats = rt.stats()
            rt.reset_stats()
            prompt = torch.as_tensor(ds.val.tokens[:32].astype("int64"))[None]
            t0 = time.perf_counter()
            gen = generate(model, prompt, SamplingConfig(max_new_tokens=gen_tokens, temperature=0.8, seed=seed))
            gen_s = time.perf_counter() - t0
            gen_stats = rt.stats()
            key = "prefetch" if prefetch else "no_prefetch"
            out[key] = {
                "eval": {"tokens": ev["tokens"], "tokens_per_s": ev["tokens_per_s"], "loss": ev["loss"],
                         "seconds": ev_s, "hit_rate": ev_stats["hit_rate"], "stall_s": ev_stats["stall_s"],
                         "misses": ev_stats["misses"]},
                "generate": {"new_tokens": int(gen.shape[1] - prompt.shape[1]), "prompt_tokens": int(prompt.shape[1]),
                             "seconds": gen_s, "tokens_per_s": (gen.shape[1] - prompt.shape[1]) / gen_s,
                             "hit_rate": gen_stats["hit_rate"], "stall_s": gen_stats["stall_s"]},
            }
            rt.close()
        out["loadavg_after"] = _loadavg()
        out["kept"] = str(table_path) if keep else None
        out["torch_threads"] = torch.get_num_threads()
        return out
    finally:
        torch.set_num_threads(prev_threads)
        if not keep:
            for p in work.glob("*.engt"):
                p.unlink(missing_ok=True)
            for p in work.glob(".*.engt.tmp-*"):
                p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- table optimizers
def bench_table_optimizer(data_dir: Optional[str] = None, *, steps: int = 12, batch_size: int = 16,
                          seq_len: int = 128, preset_name: str = "engram-moe", rounds: int = 3,
                          threads: Optional[int] = 1, workdir: Optional[str] = None,
                          table_rows_per_order: Optional[int] = None,
                          progress: bool = False) -> dict[str, Any]:
    """Training step time with dense Adam vs SparseRowAdam on the tables (same model, same batches).

    ``table_rows_per_order`` enlarges the ``engram-moe`` tables (as in :func:`bench_config`):
    dense Adam's cost and state grow with the table, the sparse one's with the rows touched.

    Both runs start from the same weights; steps alternate between them in rounds so machine
    noise hits both alike. Also reports the tables' optimizer-state bytes for each.
    ``threads``: torch intra-op threads (restored afterwards; None = torch's default).
    """
    tmp = Path(tempfile.mkdtemp(prefix="engram-bench-", dir=workdir))
    prev_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        data_path = _prepare_data(data_dir, tmp, progress)
        ds = load_dataset(data_path)
        cfg = preset(preset_name, int(ds.meta["vocab_size"]))
        if table_rows_per_order is not None:
            if preset_name != "engram-moe":
                raise ValueError(f"table_rows_per_order applies to the engram-moe preset, not {preset_name!r}")
            cfg = bench_config(int(ds.meta["vocab_size"]), table_rows_per_order)
        compression = _compression(cfg, data_path)
        runs = {}
        for name in ("adam", "sparse_adam"):
            torch.manual_seed(0)
            model = EngramLM(cfg, compression).train()
            tc = TrainConfig(batch_size=batch_size, seq_len=seq_len, table_optimizer=name)
            runs[name] = (model, build_optimizers(model, tc), tc)
        times: dict[str, list[float]] = {k: [] for k in runs}
        losses: dict[str, list[float]] = {k: [] for k in runs}
        step = 0
        for r in range(rounds + 1):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                model, opts, tc = runs[name]
                params = [p for o in opts.values() for g in o.param_groups for p in g["params"]]
                t0 = time.perf_counter()
                for s in range(steps):
                    x, y = get_batch(ds.train, batch_size, seq_len, step + s, 0)
                    loss = model(x, y).loss
                    loss.backward()
                    clip_grad_norm_(params, tc.grad_clip)
                    for o in opts.values():
                        o.step()
                        o.zero_grad(set_to_none=True)
                    model.update_moe_bias()
                    losses[name].append(float(loss.detach()))
                if r > 0:  # round 0 warms up allocators and the sparse state
                    times[name].append(time.perf_counter() - t0)
            step += steps
        sps = {k: steps * len(v) / sum(v) for k, v in times.items()}
        dense_state = sum(2 * p.numel() * p.element_size() for p in runs["adam"][0].table_parameters())
        return {
            "bench": "table_optimizer", "preset": preset_name, "batch_size": batch_size, "seq_len": seq_len,
            "adam_steps_per_s": sps["adam"], "sparse_adam_steps_per_s": sps["sparse_adam"],
            "speedup": sps["sparse_adam"] / sps["adam"],
            "adam_table_state_bytes": dense_state,
            "sparse_adam_table_state_bytes": runs["sparse_adam"][1]["tables"].state_nbytes(),
            "sparse_adam_rows_with_state": sum(runs["sparse_adam"][1]["tables"].state_rows(p)
                                               for p in runs["sparse_adam"][0].table_parameters()),
            "table_rows": sum(p.shape[0] for p in runs["adam"][0].table_parameters()),
            "table_bytes": sum(p.numel() * p.element_size() for p in runs["adam"][0].table_parameters()),
            "final_loss": {k: statistics.mean(v[-steps:]) for k, v in losses.items()},
            "steps_timed": {k: steps * len(v) for k, v in times.items()},
            "torch_threads": torch.get_num_threads(), "loadavg": _loadavg(),
        }
    finally:
        torch.set_num_threads(prev_threads)
        shutil.rmtree(tmp, ignore_errors=True)
