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

On ``device="cuda"`` every model's backbone is on the GPU: ``in_memory`` holds its tables there
too, the other three keep them in host RAM or the file and their runtime copies each batch's
rows through pinned host memory on a side CUDA stream (``engram.tables.runtime``), so
``in_memory_prefetch`` against ``in_memory`` is what serving tables from the host costs a GPU.
Round timings then synchronize the device first.

The forward is evaluation's (``model(x, y)`` under ``no_grad``, prefetch via
``TableRuntime.prefetch_batches`` exactly as ``evaluate`` does). Storage is cold: the file is
mapped with ``MADV_RANDOM`` and, after every read, its pages are dropped from the mapping
(``MADV_DONTNEED``) and from the page cache (``POSIX_FADV_DONTNEED``), so every cache miss is a
disk read. The pools start in steady state: they are first filled by replaying the row lookups
of the ``warm_batches`` batches that precede the timed ones in the stream (no forward; read
through the page cache because it is not timed, which is then dropped again), and the
no-prefetch pool gets a copy of the prefetch pool. Round 0 of the timed loop is not timed
either (allocators, threads). Each mode's pipeline is primed before its round's timer starts
(see ``_primed``): the rows of a round's first batch are fetched ahead, as they would be in a
stream that does not restart. ``overhead = 1 - offload / in_memory``; the timed rounds are
also split into ``repeats`` consecutive blocks, each reported on its own (the spread).

Two more measurements follow on fresh batches of the same stream, with the pools as the
timed rounds left them:

- serving capacity: the batches' hash ids are submitted to the ``offload`` runtime's worker
  one batch at a time, with no forward running, and waited for. Distinct rows delivered per
  second (over layers), and the model tokens per second that rate feeds
  (``capacity_tokens_per_s``): a forward slower than that can have its rows hidden by
  prefetch; a faster one waits for the tier.
- a fast forward: the model's forward is replaced by a stand-in of fixed duration (batch
  tokens / the stand-in's tokens/s; it first waits for the batch's rows, then sleeps out the
  rest, as a host thread does while a GPU computes), fed by ``prefetch_batches`` exactly as
  the real forward is. Run for the paper's 9,031 tokens/s and for fractions and multiples of
  the measured capacity, with the in-memory prefetch runtime as the baseline at each speed:
  where prefetch stops hiding the fetch.

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from engram.bench.config import LargeTableBenchConfig as _L
from engram.bench.config import OffloadBenchConfig as _O
from engram.bench.config import TableOptimizerBenchConfig
from engram.config import ModelConfig, TrainConfig, preset
from engram.data.shards import Dataset, get_batch, iter_eval_batches, load_dataset, prepare_builtin
from engram.errors import EngramError
from engram.model.accel import resolve_device
from engram.model.generation import SamplingConfig, generate
from engram.model.lm import EngramLM
from engram.model.table import TABLE_KEY_SUFFIX
from engram.tables.process import open_layer_storage
from engram.tables.runtime import TableRuntime, attach_tables, build_model_without_tables, table_runtime
from engram.tables.tablefile import TableHeader, TableWriter, open_table, save_model_tables
from engram.tables.tiers import CachedStorage, MemoryStorage, MmapStorage, StorageConfig, TableStorage
from engram.training.evaluation import evaluate
from engram.training.optimization import optimizer_params, optimizer_step
from engram.training.trainer import _dataset_compression, build_optimizers

PAPER_TOKENS_PER_S = 9031.0  # the paper's offloaded-table serving throughput (its Sec. 6)
COLD_METHOD = ("mmap with MADV_RANDOM; after every read the layer's pages are dropped from the "
               "mapping (MADV_DONTNEED) and the page cache (POSIX_FADV_DONTNEED)")


def _bench_data(data_dir: Optional[str], work: Path, progress: bool) -> tuple[Path, Dataset]:
    """The dataset a benchmark reads: ``data_dir``, or else the built-in corpus prepared under
    ``work``. Returns (its directory, the loaded dataset)."""
    if data_dir is None:
        out = work / "data"
        prepare_builtin(str(out), tokenizer="bpe", vocab_size=4096, progress=progress)
    else:
        out = Path(data_dir)
    return out, load_dataset(out)


def _bench_workspace(closing: ExitStack, workdir: Optional[str], threads: Optional[int], data_dir: Optional[str],
                     progress: bool, prefix: str = "engram-bench-") -> tuple[Path, Path, Dataset]:
    """A benchmark's set-up inside ``closing``: a temporary directory (removed when it unwinds),
    ``threads`` torch threads until then, and the dataset (``_bench_data``). Returns (the
    directory, the dataset's directory, the dataset)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    closing.callback(shutil.rmtree, tmp, ignore_errors=True)
    closing.enter_context(_torch_threads(threads))
    data_path, ds = _bench_data(data_dir, tmp, progress)
    return tmp, data_path, ds


def _preset_config(preset_name: str, vocab: int, rows_per_head: Optional[int]) -> ModelConfig:
    """``preset_name`` at ``vocab``; with ``rows_per_head`` the engram-moe preset with
    tables of that size (``bench_config``)."""
    if rows_per_head is None:
        return preset(preset_name, vocab)
    if preset_name != "engram-moe":
        raise EngramError(f"rows_per_head applies to the engram-moe preset, not {preset_name!r}")
    return bench_config(vocab, rows_per_head)


@contextmanager
def _torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: torch's default); restored after."""
    prev = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(prev)


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


def bench_config(vocab_size: int, rows_per_head: int) -> ModelConfig:
    """The ``engram-moe`` preset with bigger tables (rows per head ~ ``rows_per_head``)."""
    cfg = preset("engram-moe", vocab_size)
    assert cfg.engram is not None
    eng = dataclasses.replace(cfg.engram, rows_per_head=(rows_per_head,) * len(cfg.engram.rows_per_head))
    return dataclasses.replace(cfg, engram=eng)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded ([] where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


@dataclass(frozen=True)
class _OffloadSettings:
    """``bench_offload``'s arguments that the stages need."""
    batch_size: int
    seq_len: int
    rounds: int
    batches_per_round: int
    warm_batches: int
    cache_rows: int
    rows_per_head: int
    policy: str
    io_threads: int
    dtype: str
    cold: bool
    process: bool
    repeats: int = 3
    capacity_batches: int = 16
    standin_batches: int = 16
    standin_tokens_per_s: Optional[tuple[float, ...]] = None  # None: the paper's and capacity-relative


def bench_offload(data_dir: Optional[str] = None, *, batch_size: int = _O.batch_size, seq_len: int = _O.seq_len,
                  rounds: int = _O.rounds, batches_per_round: int = _O.batches_per_round,
                  warm_batches: int = _O.warm_batches, cache_rows: int = _O.cache_rows,
                  rows_per_head: int = _O.rows_per_head, policy: str = _O.policy, io_threads: int = _O.io_threads,
                  dtype: str = _O.dtype, cold: bool = _O.cold, workdir: Optional[str] = _O.workdir,
                  threads: Optional[int] = _O.threads, process: bool = _O.process, pin: bool = _O.pin,
                  progress: bool = False, seed: int = 0, repeats: int = _O.repeats,
                  capacity_batches: int = _O.capacity_batches, standin_batches: int = _O.standin_batches,
                  standin_tokens_per_s: Optional[Sequence[float]] = _O.standin_tokens_per_s,
                  device: str = _O.device) -> dict[str, Any]:
    """Tokens/s of the four modes (see the module docstring), the offload overheads with their
    spread over ``repeats`` blocks of rounds (at most ``rounds``), the tier's serving capacity and the overhead in
    front of a fixed-speed stand-in forward (``standin_tokens_per_s``; None: the paper's 9,031
    and 0.5x, 1x, 2x the measured capacity; an empty list skips it).

    ``threads`` sets torch's intra-op threads for the run (restored afterwards; None keeps
    torch's default, one per core). The default is 1: the model computes on one core and the
    prefetch and I/O threads have the other, as a GPU's host CPU would. It is also the setting
    that stays stable on a shared machine: with two OpenMP threads per team and other
    processes competing for the cores, a forward can slow down several-fold (measured here:
    0.34 s/batch with one thread vs 1.5-5.7 s with two under a load average of 9), and an
    extra Python thread that merely wakes up changes that (2.7x) - which would flatter the
    prefetching mode. ``--threads 2`` measures the all-cores setting.

    Everything the run starts (fetch helper processes, table runtimes and their threads, the
    temporary directory with the table file) is closed or removed on the way out, also when a
    stage fails.
    """
    if min(batch_size, seq_len, rounds, batches_per_round, cache_rows, repeats, capacity_batches, standin_batches) < 1:
        raise EngramError("batch_size, seq_len, rounds, batches_per_round, cache_rows, repeats, capacity_batches "
                          "and standin_batches must be >= 1")
    if standin_tokens_per_s is not None and any(v <= 0 for v in standin_tokens_per_s):
        raise EngramError(f"standin_tokens_per_s={list(standin_tokens_per_s)}: speeds must be > 0")
    if threads is not None and threads < 1:
        raise EngramError(f"threads={threads} must be >= 1")
    dev = resolve_device(device)
    s = _OffloadSettings(batch_size, seq_len, rounds, batches_per_round, warm_batches, cache_rows,
                         rows_per_head, policy, io_threads, dtype, cold, process,
                         min(repeats, rounds),  # a repeat is a block of whole rounds
                         capacity_batches, standin_batches,
                         None if standin_tokens_per_s is None else tuple(float(v) for v in standin_tokens_per_s))

    t_setup = time.perf_counter()
    with ExitStack() as closing:  # unwinds last-in first-out: runtimes, then threads, then the directory
        tmp, data_path, ds = _bench_workspace(closing, workdir, threads, data_dir, progress)
        cfg = bench_config(int(ds.meta["vocab_size"]), rows_per_head)
        if seq_len > cfg.max_seq_len:
            raise EngramError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        warm, batches, extra = _offload_batches(ds, s)
        table_path = tmp / "bench.engt"
        models, header = _offload_models(cfg, _dataset_compression(cfg, ds, data_path), table_path, s, seed,
                                         progress, closing, dev)
        warm_s, warm_hit_rate = _warm_pools(models, warm, table_path, s.cold, progress)
        equal = _outputs_equal(models, batches[0])
        for name in ("offload", "no_prefetch"):  # the check's lookups are not part of the measurement
            _runtime(models[name]).reset_stats()
        setup_s = time.perf_counter() - t_setup
        rounds_run = _timed_rounds(models, batches, s, pin, progress)
        report = _offload_report(models, header, s, rounds_run, equal=equal, warm_s=warm_s,
                                 warm_hit_rate=warm_hit_rate, setup_s=setup_s)
        report["device"] = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
        pinned = _pin_cpus(models) if pin else None
        try:
            report["capacity"] = cap = _capacity(models, extra[:s.capacity_batches], s)
            report["capacity_tokens_per_s"] = cap["tokens_per_s"]
            report["capacity_rows_per_s"] = cap["distinct_rows_per_s"]
            speeds = s.standin_tokens_per_s
            if speeds is None:
                speeds = (PAPER_TOKENS_PER_S, *(f * cap["tokens_per_s"] for f in (0.5, 1.0, 2.0)))
            report["fast_forward"] = _standin_sweep(models, extra[s.capacity_batches:], sorted(speeds), s)
        finally:
            _unpin_cpus(pinned)
        return report


def _runtime(model: torch.nn.Module) -> TableRuntime:
    """The table runtime serving an offloaded model."""
    rt = table_runtime(model)
    assert rt is not None, "an offloaded model has a table runtime"
    return rt


def _standin_speeds(s: _OffloadSettings) -> int:
    return 4 if s.standin_tokens_per_s is None else len(s.standin_tokens_per_s)


def _offload_batches(ds: Dataset, s: _OffloadSettings) -> tuple[list[Any], list[Any], list[Any]]:
    """The stream's first ``warm_batches`` batches (they fill the pools), the timed rounds'
    batches after them (round 0 included), and then the batches of the capacity and stand-in
    runs (fresh rows for the pools); raises when the training split is too short."""
    timed = (s.rounds + 1) * s.batches_per_round
    need = s.warm_batches + timed + s.capacity_batches + _standin_speeds(s) * s.standin_batches
    stream = iter_eval_batches(ds.train, s.batch_size, s.seq_len)
    batches = [b for _, b in zip(range(need), stream)]
    if len(batches) < need:
        raise EngramError(f"the dataset has only {len(batches)} batches of {s.batch_size} x {s.seq_len}, "
                         f"the run needs {need}; lower warm_batches, rounds, batches_per_round, "
                         f"capacity_batches or standin_batches")
    w = s.warm_batches
    return batches[:w], batches[w:w + timed], batches[w + timed:]


def _offload_models(cfg: ModelConfig, compression: Any, table_path: Path, s: _OffloadSettings, seed: int,
                    progress: bool, closing: ExitStack, device: torch.device = torch.device("cpu")
                    ) -> tuple[dict[str, torch.nn.Module], TableHeader]:
    """The four models of the module docstring, by name, with the same weights: ``in_memory``
    (initialised from ``seed``; its tables are saved to ``table_path``) and three that a table
    runtime serves. Returns them and the table file's header.

    Every storage and runtime is registered with ``closing`` as soon as it exists, so that fetch
    helper processes and I/O threads end even when building a later one, or a later stage, fails.
    """
    torch.manual_seed(seed)
    mem = EngramLM(cfg, compression).eval()
    save_model_tables(mem, table_path, dtype=s.dtype, progress=progress)
    header = open_table(table_path, mem.hasher, cfg.engram.head_dim)
    backbone = {k: v for k, v in mem.state_dict().items() if not k.endswith(TABLE_KEY_SUFFIX)}
    # the served modes' host copies (on a GPU, mem's own tables move to the device below)
    mem_tables = {e.layer_id: e.table.weight if device.type == "cpu" else e.table.weight.detach().clone()
                  for e in mem.engram_layers}
    mem.to(device)
    scfg = StorageConfig(path=str(table_path), kind="cached", cache_rows=s.cache_rows, cache_policy=s.policy,
                         io_threads=s.io_threads, cold=s.cold, process=s.process)

    def served(prefetch: bool, in_memory: bool = False) -> torch.nn.Module:
        m = build_model_without_tables(cfg, compression)
        m.load_state_dict(backbone, strict=False)
        m.to(device)
        # in_memory: the same runtime and worker thread, over mem's tables in RAM
        layer_ids = list(mem_tables) if in_memory else list(header.layers)
        storages = {}
        for lid in layer_ids:
            st = MemoryStorage(mem_tables[lid]) if in_memory else open_layer_storage(scfg, header, lid)
            closing.callback(st.close)
            storages[lid] = st
        closing.callback(attach_tables(m, storages, prefetch=prefetch, device=device).close)
        return m.eval()

    return {"in_memory": mem, "in_memory_prefetch": served(True, in_memory=True),
            "offload": served(True), "no_prefetch": served(False)}, header


def _warm_pools(models: dict[str, torch.nn.Module], warm: list[Any], table_path: Path, cold: bool,
                progress: bool) -> tuple[float, float]:
    """Steady state: both cached pools replay the row lookups of the ``warm`` batches (no forward;
    through the page cache, since this is not timed), then their reads go cold (pages dropped)
    if ``cold``. Returns (seconds, the prefetching pool's hit rate while warming)."""
    hasher = models["in_memory"].hasher
    runtimes = [_runtime(models["offload"]), _runtime(models["no_prefetch"])]
    t_warm = time.perf_counter()
    for rt in runtimes:
        for st in rt.storages.values():
            _set_cold(st, False)
    _read_through(table_path)
    for x, _ in tqdm(warm, desc="warm pools", disable=not progress, leave=False):
        hashed = hasher.hash(x)
        for rt in runtimes:
            for lid, ids in hashed.items():
                rt._fetch(lid, ids)
    for rt in runtimes:
        for st in rt.storages.values():
            _set_cold(st, cold)
    return time.perf_counter() - t_warm, runtimes[0].stats()["hit_rate"]


def _outputs_equal(models: dict[str, torch.nn.Module], batch: Any) -> bool:
    """Whether every model's logits on ``batch`` equal the in-memory model's, bit for bit."""
    with torch.no_grad():
        x, y = (t.to(_device(models["in_memory"])) for t in batch)
        ref = models["in_memory"](x, y).logits
        return all(torch.equal(ref, m(x, y).logits) for k, m in models.items() if k != "in_memory")


def _device(model: torch.nn.Module) -> torch.device:
    return model.embed.weight.device


def _sync(model: torch.nn.Module) -> None:
    """Wait for the model's GPU work (a round's time is the device's, not the launches')."""
    if _device(model).type == "cuda":
        torch.cuda.synchronize(_device(model))


def _primed(model: torch.nn.Module, chunk: list[Any]) -> tuple[Iterator[Any], Any]:
    """(the rest of ``chunk``, its first batch) as the model's runtime serves them; with prefetch
    the first batch's rows are fetched before this returns. In a stream that does not stop, a
    batch's rows are fetched during the previous batch's forward; the benchmark restarts the
    stream every round, and priming keeps that restart's first fetch (up to 1/batches_per_round
    of a round) out of the timed steady state. Applies alike to every mode that prefetches."""
    rt = table_runtime(model)
    if rt is None or not rt.prefetch:
        dev = _device(model)
        it = iter(chunk) if dev.type == "cpu" else ((x.to(dev), y.to(dev)) for x, y in chunk)
        return it, next(it)
    it = rt.prefetch_batches(chunk)
    first = next(it)  # submits the first batches; the first one's ticket is now pending
    for f in rt._pending[-1].futures.values():
        f.result()
    return it, first


def _timed_rounds(models: dict[str, torch.nn.Module], batches: list[Any], s: _OffloadSettings, pin: bool,
                  progress: bool) -> dict[str, Any]:
    """Run every model over each round's batches, rotating who goes first, with the CPUs pinned
    (``pin``; undone on the way out). Round 0 is not timed: it resets the runtimes' stats after.
    Returns the seconds per timed round by model ("times"), the pinning and the load averages."""
    pinned = _pin_cpus(models) if pin else None
    try:
        times: dict[str, list[float]] = {k: [] for k in models}
        cpu: dict[str, list[float]] = {k: [] for k in models}  # the model thread's CPU time
        load_before = load_average()
        order = list(models)
        bar = tqdm(total=(s.rounds + 1) * len(models), desc="bench offload", disable=not progress, leave=False)
        for r in range(s.rounds + 1):
            chunk = batches[r * s.batches_per_round:(r + 1) * s.batches_per_round]
            for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                m = models[name]
                rt = table_runtime(m)
                it, first = _primed(m, chunk)
                t0, c0 = time.perf_counter(), time.thread_time()
                with torch.no_grad():
                    m(*first)
                    for x, y in it:
                        m(x, y)
                    _sync(m)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                if r == 0:  # warm-up round: fills the pools, not timed
                    if rt is not None:
                        rt.reset_stats()
                else:
                    times[name].append(dt)
                    cpu[name].append(dc)
                bar.update(1)
        bar.close()
        return {"times": times, "cpu": cpu, "pinned": pinned, "load_before": load_before, "load_after": load_average()}
    finally:
        _unpin_cpus(pinned)


def _capacity(models: dict[str, torch.nn.Module], batches: list[Any], s: _OffloadSettings) -> dict[str, Any]:
    """The offload tier's serving rate with no forward running: each batch's rows are fetched on
    the runtime's worker (as prefetch does) and waited for, one batch at a time."""
    rt = _runtime(models["offload"])
    hasher = models["in_memory"].hasher
    hashed = [hasher.hash(x) for x, _ in batches]  # not timed: the forward's pre-hook hashes too
    distinct = sum(int(torch.unique(ids.to(torch.int64) + rt.offsets[lid]).numel())
                   for h in hashed for lid, ids in h.items())
    rt.reset_stats()
    times = []
    for h in hashed:
        t0 = time.perf_counter()
        ticket = rt.submit(hash_ids=h)
        for f in ticket.futures.values():
            f.result()
        times.append(time.perf_counter() - t0)
    st = rt.stats()
    total = sum(times)
    tokens = len(batches) * s.batch_size * s.seq_len
    return {"batches": len(batches), "tokens": tokens, "seconds": total, "tokens_per_s": tokens / total,
            "distinct_rows": distinct, "distinct_rows_per_s": distinct / total,
            "distinct_rows_per_token": distinct / tokens, "hit_rate": st["hit_rate"], "misses": st["misses"],
            "batch_ms_median": 1e3 * statistics.median(times),
            "batch_ms_spread": [1e3 * min(times), 1e3 * max(times)],
            "method": "rows of one batch at a time fetched on the prefetch worker, no forward running; "
                      "hashing not included"}


def _standin_run(model: torch.nn.Module, batches: list[Any], tokens_per_s: float, s: _OffloadSettings) -> dict[str, float]:
    """``batches`` through the model's runtime with prefetch, each 'forward' a stand-in of
    fixed duration: wait for the batch's rows, then sleep until the duration is over."""
    rt = _runtime(model)
    period = s.batch_size * s.seq_len / tokens_per_s
    stall = 0.0
    t_start = time.perf_counter()
    for x, _ in rt.prefetch_batches(batches):
        t0 = time.perf_counter()
        ticket = rt._claim(x)
        if ticket is None:  # not prefetched (cannot happen with prefetch_batches): fetch now
            ticket = rt.submit(input_ids=x)
        for f in ticket.futures.values():
            f.result()
        waited = time.perf_counter() - t0
        stall += waited
        if waited < period:
            time.sleep(period - waited)
    total = time.perf_counter() - t_start
    return {"seconds": total, "tokens_per_s": len(batches) * s.batch_size * s.seq_len / total, "stall_s": stall}


def _standin_sweep(models: dict[str, torch.nn.Module], batches: list[Any], speeds: list[float],
                   s: _OffloadSettings) -> list[dict[str, Any]]:
    """For each stand-in speed (fresh batches each): in-memory prefetch, then the offload tier."""
    out = []
    for i, tps in enumerate(speeds):
        chunk = batches[i * s.standin_batches:(i + 1) * s.standin_batches]
        mem = _standin_run(models["in_memory_prefetch"], chunk, tps, s)
        off = _standin_run(models["offload"], chunk, tps, s)
        ideal = len(chunk) * s.batch_size * s.seq_len / tps
        out.append({"standin_tokens_per_s": tps, "batches": len(chunk),
                    "in_memory_prefetch_tokens_per_s": mem["tokens_per_s"],
                    "offload_tokens_per_s": off["tokens_per_s"],
                    "overhead_vs_in_memory_prefetch": 1 - off["tokens_per_s"] / mem["tokens_per_s"],
                    "overhead_vs_standin": off["seconds"] / ideal - 1,
                    "stall_s": {"in_memory_prefetch": mem["stall_s"], "offload": off["stall_s"]}})
    return out


def _offload_report(models: dict[str, torch.nn.Module], header: TableHeader, s: _OffloadSettings,
                    rounds_run: dict[str, Any], *, equal: bool, warm_s: float, warm_hit_rate: float,
                    setup_s: float) -> dict[str, Any]:
    """Tokens/s, overheads and the runtimes' stats as ``bench_offload``'s JSON report."""
    times = rounds_run["times"]
    tokens_per_round = s.batch_size * s.seq_len * s.batches_per_round
    tps = {k: tokens_per_round * len(v) / sum(v) for k, v in times.items()}
    per_round_overhead = [1 - a / b for a, b in zip(times["in_memory"], times["offload"])]
    blocks = []  # the timed rounds in ``repeats`` consecutive blocks, each a measurement of its own
    for k in range(s.repeats):
        a, b = k * s.rounds // s.repeats, (k + 1) * s.rounds // s.repeats
        t = {name: sum(v[a:b]) for name, v in times.items()}
        blocks.append({"rounds": [a + 1, b], "overhead": 1 - t["in_memory"] / t["offload"],
                       "overhead_vs_in_memory_prefetch": 1 - t["in_memory_prefetch"] / t["offload"]})
    st_pf, st_np = _runtime(models["offload"]).stats(), _runtime(models["no_prefetch"]).stats()
    file_bytes = header.file_bytes
    pool_bytes = len(header.layers) * CachedStorage.ram_bytes(s.cache_rows, header.dim, header.itemsize, s.policy)
    return {
        "bench": "offload",
        "in_memory_tokens_per_s": tps["in_memory"],
        "offload_tokens_per_s": tps["offload"],
        "no_prefetch_tokens_per_s": tps["no_prefetch"],
        "overhead": 1 - tps["offload"] / tps["in_memory"],
        "in_memory_prefetch_tokens_per_s": tps["in_memory_prefetch"],
        "overhead_vs_in_memory_prefetch": 1 - tps["offload"] / tps["in_memory_prefetch"],
        # Work the model's own thread did (it waits for late rows off-CPU): what offloading adds
        # to the forward's thread, far less disturbed than wall time when others share the cores.
        "cpu_overhead_vs_in_memory_prefetch": sum(rounds_run["cpu"]["offload"])
        / sum(rounds_run["cpu"]["in_memory_prefetch"]) - 1,
        "model_thread_cpu_s": {k: sum(v) for k, v in rounds_run["cpu"].items()},
        "no_prefetch_overhead": 1 - tps["no_prefetch"] / tps["in_memory"],
        "prefetch_speedup": tps["offload"] / tps["no_prefetch"],
        "hit_rate": st_pf["hit_rate"],
        "overhead_per_round": per_round_overhead,
        "overhead_median_round": statistics.median(per_round_overhead),
        "repeats": blocks,
        "overhead_spread": [min(b["overhead"] for b in blocks), max(b["overhead"] for b in blocks)],
        "overhead_vs_in_memory_prefetch_spread": [min(b["overhead_vs_in_memory_prefetch"] for b in blocks),
                                                  max(b["overhead_vs_in_memory_prefetch"] for b in blocks)],
        "outputs_equal": equal,
        "stall_s": {"offload": st_pf["stall_s"], "no_prefetch": st_np["stall_s"]},
        "timed_s": {k: sum(v) for k, v in times.items()},
        "misses": {"offload": st_pf["misses"], "no_prefetch": st_np["misses"]},
        "bytes_read": {"offload": sum(l["mmap"]["bytes_read"] for l in st_pf["layers"].values())},
        "table": {"file_bytes": file_bytes, "rows": header.rows, "dim": header.dim, "dtype": s.dtype,
                  "pool_rows_per_layer": s.cache_rows, "pool_bytes": pool_bytes,
                  "file_to_pool": file_bytes / pool_bytes, "policy": s.policy, "io_threads": s.io_threads,
                  "fetch_process": s.process},
        "cold_storage": COLD_METHOD if s.cold else "warm page cache (cold=False)",
        "pipeline": "primed before each timed round: the first batch's rows are fetched ahead, as in a "
                    "stream that does not restart",
        "batch_size": s.batch_size, "seq_len": s.seq_len, "rounds": s.rounds,
        "batches_per_round": s.batches_per_round, "warmup_rounds": 1,
        "warm_batches": s.warm_batches, "warm_tokens": s.warm_batches * s.batch_size * s.seq_len,
        "warm_s": warm_s, "warm_hit_rate": warm_hit_rate,
        "model": "engram-moe backbone, rows per hash head "
                 f"{s.rows_per_head}, {header.rows:,} table rows x {header.dim}",
        "torch_threads": torch.get_num_threads(), "cpu_pinning": rounds_run["pinned"],
        "loadavg_before": rounds_run["load_before"], "loadavg_after": rounds_run["load_after"], "setup_s": setup_s,
    }


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


def bench_large_table(data_dir: Optional[str] = None, *, size_gib: float = _L.size_gib,
                      cache_rows: int = _L.cache_rows, policy: str = _L.policy, io_threads: int = _L.io_threads,
                      eval_batches: int = _L.eval_batches, batch_size: int = 8, seq_len: int = 256,
                      gen_tokens: int = _L.gen_tokens, workdir: Optional[str] = _L.workdir, keep: bool = _L.keep,
                      cold: bool = True, threads: Optional[int] = _L.threads, progress: bool = False,
                      seed: int = 0) -> dict[str, Any]:
    """A table of ``size_gib`` on disk served from a cached tier: eval and generation tokens/s.

    ``threads``: torch intra-op threads for the run (restored afterwards; None = torch's default).
    The table runtimes (and their I/O threads) are closed, and the table file deleted unless
    ``keep``, also when a stage fails.
    """
    work = Path(workdir or tempfile.gettempdir()) / "engram-large-table"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with _torch_threads(threads):
            data_path, ds = _bench_data(data_dir, work, progress)
            cfg = _large_table_config(int(ds.meta["vocab_size"]), size_gib, work)
            torch.manual_seed(seed)
            model = build_model_without_tables(cfg, _dataset_compression(cfg, ds, data_path)).eval()
            table_path = work / "large.engt"
            header, write_s = _open_or_write_random_table(table_path, model, seed, progress)
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            out: dict[str, Any] = {
                "bench": "large_table", "file_bytes": header.file_bytes, "ram_bytes": ram,
                "file_to_ram": header.file_bytes / ram, "rows": header.rows, "dim": header.dim,
                "dtype": header.dtype, "write_s": write_s, "cache_rows_per_layer": cache_rows,
                "policy": policy, "io_threads": io_threads,
                "cold_storage": COLD_METHOD if cold else "warm page cache", "loadavg_before": load_average(),
            }

            def open_storage(lid: int) -> TableStorage:
                return CachedStorage(MmapStorage(header, lid, io_threads=io_threads, cold=cold), cache_rows, policy)

            for prefetch in (True, False):
                out["prefetch" if prefetch else "no_prefetch"] = _serve_eval_and_generate(
                    model, header, open_storage, prefetch, ds, eval_batches=eval_batches, batch_size=batch_size,
                    seq_len=seq_len, gen_tokens=gen_tokens, seed=seed)
            out["loadavg_after"] = load_average()
            out["kept"] = str(table_path) if keep else None
            out["torch_threads"] = torch.get_num_threads()
            return out
    finally:
        if not keep:
            for p in work.glob("*.engt"):
                p.unlink(missing_ok=True)
            for p in work.glob(".*.engt.tmp-*"):
                p.unlink(missing_ok=True)


def _large_table_config(vocab: int, size_gib: float, work: Path) -> ModelConfig:
    """The ``engram-moe`` preset with tables of ``size_gib`` in all (fp32); raises when that does
    not fit on ``work``'s disk (unless an earlier ``keep`` run left the table there)."""
    base = preset("engram-moe", vocab)
    assert base.engram is not None
    row_bytes = base.engram.head_dim * 4
    heads = base.engram.num_heads_total
    per_head = int(size_gib * 2**30 / row_bytes / heads)
    need = per_head * heads * row_bytes
    free = shutil.disk_usage(work).free
    if need > free * 0.9 and not (work / "large.engt").is_file():
        raise EngramError(f"a {size_gib:g} GiB table does not fit in the {free / 2**30:.1f} GiB free "
                         f"in {work}; pass a smaller size_gib or another workdir")
    return bench_config(vocab, per_head)


def _open_or_write_random_table(path: Path, model: torch.nn.Module, seed: int,
                                progress: bool) -> tuple[TableHeader, Optional[float]]:
    """Open the table at ``path`` when an earlier ``keep`` run wrote it for this configuration,
    else write one of random rows. Returns (its header, the seconds writing took or None)."""
    t0 = time.perf_counter()
    try:
        return open_table(path, model.hasher, model.cfg.engram.head_dim), None
    except (FileNotFoundError, ValueError):
        _write_random_table(path, model, model.cfg.engram.table_init_std, seed, 1 << 21, progress)
        write_s = time.perf_counter() - t0
        return open_table(path, model.hasher, model.cfg.engram.head_dim), write_s


def _serve_eval_and_generate(model: torch.nn.Module, header: TableHeader, open_storage: Callable[[int], TableStorage],
                             prefetch: bool, ds: Dataset, *, eval_batches: int, batch_size: int, seq_len: int,
                             gen_tokens: int, seed: int) -> dict[str, Any]:
    """Serve ``model``'s tables from a fresh storage per layer (``open_storage``), with or without
    prefetch; evaluate on the validation split, then generate. The storages and the runtime are
    closed on the way out. Returns the tokens/s, hit rates and stalls of both ("eval", "generate")."""
    with ExitStack() as closing:
        storages = {}
        for lid in header.layers:
            storages[lid] = st = open_storage(lid)
            closing.callback(st.close)
        rt = attach_tables(model, storages, prefetch=prefetch)
        closing.callback(rt.close)
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
        return {
            "eval": {"tokens": ev["tokens"], "tokens_per_s": ev["tokens_per_s"], "loss": ev["loss"],
                     "seconds": ev_s, "hit_rate": ev_stats["hit_rate"], "stall_s": ev_stats["stall_s"],
                     "misses": ev_stats["misses"]},
            "generate": {"new_tokens": int(gen.shape[1] - prompt.shape[1]), "prompt_tokens": int(prompt.shape[1]),
                         "seconds": gen_s, "tokens_per_s": (gen.shape[1] - prompt.shape[1]) / gen_s,
                         "hit_rate": gen_stats["hit_rate"], "stall_s": gen_stats["stall_s"]},
        }


# ----------------------------------------------------------------------------- table optimizers
def bench_table_optimizer(data_dir: Optional[str] = None, *, steps: int = TableOptimizerBenchConfig.steps,
                          batch_size: int = TableOptimizerBenchConfig.batch_size,
                          seq_len: int = TableOptimizerBenchConfig.seq_len, preset_name: str = "engram-moe",
                          rounds: int = TableOptimizerBenchConfig.rounds,
                          threads: Optional[int] = TableOptimizerBenchConfig.threads, workdir: Optional[str] = None,
                          rows_per_head: Optional[int] = TableOptimizerBenchConfig.rows_per_head,
                          progress: bool = False) -> dict[str, Any]:
    """Training step time with dense Adam vs SparseRowAdam on the tables (same model, same batches).

    ``rows_per_head`` enlarges the ``engram-moe`` tables (as in :func:`bench_config`):
    dense Adam's cost and state grow with the table, the sparse one's with the rows touched.

    Both runs start from the same weights; steps alternate between them in rounds so machine
    noise hits both alike. Also reports the tables' optimizer-state bytes for each.
    ``threads``: torch intra-op threads (restored afterwards; None = torch's default).
    """
    with ExitStack() as closing:  # unwinds last-in first-out: threads, then the directory
        _, data_path, ds = _bench_workspace(closing, workdir, threads, data_dir, progress)
        cfg = _preset_config(preset_name, int(ds.meta["vocab_size"]), rows_per_head)
        compression = _dataset_compression(cfg, ds, data_path)
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
                params = optimizer_params(opts)
                t0 = time.perf_counter()
                for s in range(steps):
                    x, y = get_batch(ds.train, batch_size, seq_len, step + s, 0)
                    loss = model(x, y).loss
                    loss.backward()
                    optimizer_step(opts, params, tc.grad_clip)  # the training loop's clip + step
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
            "torch_threads": torch.get_num_threads(), "loadavg": load_average(),
        }
