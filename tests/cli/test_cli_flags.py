"""Command-line flags generated from the configs: every field settable, defaults from one place,
wrong types refused in one line, and a parser that does not load torch."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engram.cli.bench as cli_bench
import engram.cli.main as cli_main
from engram.cli.flags import add_config_flags, config_from_args, flag_name, int_list
from engram.cli.main import GENERATE_DEFAULTS, build_parser, main
from engram.cli.table import storage_from_args
from engram.config import (
    GateConfig,
    PatchBenchConfig,
    PatchTrainConfig,
    SamplingConfig,
    ServeLimits,
    StorageConfig,
    TableLocation,
)
from engram.errors import EngramError

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}  # this checkout

# command line -> (config it builds, the fields that are not plain flags of it)
COMMANDS = {
    ("patch", "train", "--ckpt", "R", "--data", "x.txt", "--out", "p.engp"): (PatchTrainConfig, {}),
    ("bench", "patch"): (PatchBenchConfig, {}),
    ("generate", "--ckpt", "R", "--prompt", "hi"): (SamplingConfig, GENERATE_DEFAULTS),
    ("ngram", "train-gate", "--ckpt", "R", "--data", "D", "--index", "I"): (GateConfig, {"hidden_bound": 0.5}),
    ("serve", "--ckpt", "R"): (ServeLimits, {}),
}


def parse(*argv):
    return build_parser().parse_args(list(argv))


def flags_of(*argv) -> set[str]:
    """Every option string of the subcommand ``argv`` names."""
    p = build_parser()
    for word in argv:
        p = next(a for a in p._actions if a.dest in ("command", "sub", "sweep_cmd")).choices[word]
    return {s for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_field_is_a_flag_and_defaults_come_from_the_config(argv):
    cls, cli_defaults = COMMANDS[argv]
    words = [w for w in argv[:2] if not w.startswith("-")]
    flags = flags_of(*words)
    for f in dataclasses.fields(cls):
        assert flag_name(f) in flags, f"{cls.__name__}.{f.name} has no flag {flag_name(f)}"
    cfg = config_from_args(parse(*argv), cls, **({"hidden_size": 0} if cls is GateConfig else {}))
    expected = dataclasses.replace(cls(), **cli_defaults)
    assert cfg == expected


def test_patch_train_sets_every_field_including_lr_floor_and_clip():
    args = parse("patch", "train", "--ckpt", "R", "--data", "a.txt", "b.txt", "--out", "p.engp",
                 "--steps", "7", "--batch-size", "3", "--seq-len", "40", "--lr", "0.01", "--table-lr-mult", "2",
                 "--warmup-steps", "1", "--min-lr-ratio", "0.25", "--grad-clip", "0.5", "--train-gates",
                 "--anchor", "0.1", "--protect-min-count", "4", "--rehearsal", "0.5", "--rehearsal-batch-size", "2",
                 "--quantize", "int8", "--seed", "9")
    cfg = config_from_args(args, PatchTrainConfig)
    assert cfg == PatchTrainConfig(steps=7, batch_size=3, seq_len=40, lr=0.01, table_lr_mult=2.0, warmup_steps=1,
                                   min_lr_ratio=0.25, grad_clip=0.5, train_gates=True, anchor=0.1,
                                   protect_min_count=4, rehearsal=0.5, rehearsal_batch_size=2,
                                   quantization="int8", seed=9)
    assert args.data == ["a.txt", "b.txt"] and args.quantize == "int8"  # existing names keep their dest


def test_bench_patch_variants_and_gate_flags():
    cfg = config_from_args(parse("bench", "patch", "--variant", "steps=600", "--variant", "rehearsal=0",
                                 "--patch-batch-size", "4", "--preset", "tiny"), PatchBenchConfig)
    assert cfg.variants == ("steps=600", "rehearsal=0") and cfg.patch_batch_size == 4 and cfg.preset == "tiny"
    args = parse("ngram", "train-gate", "--ckpt", "R", "--data", "D", "--index", "I", "--hidden",
                 "--features", "no_match", "log_count", "--width", "8", "--estimator", "kn")
    cfg = config_from_args(args, GateConfig, hidden_size=64 if args.hidden else 0)
    assert (cfg.hidden_size, cfg.features, cfg.width, cfg.estimator) == (64, ("no_match", "log_count"), 8, "kn")


def test_storage_switches_build_the_storage_config():
    assert storage_from_args(parse("eval", "--ckpt", "R", "--data", "D")) is None  # plain in-memory model
    cfg = storage_from_args(parse("eval", "--ckpt", "R", "--data", "D", "--table", "t.engt", "--cache-rows", "10",
                                  "--cache-policy", "lfu", "--io-threads", "2", "--cold", "--no-fetch-process"))
    assert cfg == StorageConfig(path="t.engt", kind=TableLocation.CACHED, cache_rows=10, cache_policy="lfu",
                                prefetch=True, io_threads=2, cold=True, process=False)
    cfg = storage_from_args(parse("generate", "--ckpt", "R", "--prompt", "x", "--table", "t.engt",
                                  "--storage", "mmap", "--no-prefetch"))
    assert (cfg.kind, cfg.prefetch, cfg.process) == (TableLocation.MMAP, False, True)
    # train's --prefetch is train.prefetch: None (not given) leaves the preset / --set value alone
    assert parse("train", "--data", "D", "--out", "O").prefetch is None
    assert parse("train", "--data", "D", "--out", "O", "--no-prefetch").prefetch is False


def test_add_config_flags_spells_types_and_switches():
    p = cli_main.ArgumentParser(prog="t")
    add_config_flags(p, StorageConfig, only=("cold", "process", "cache_rows"))
    a = p.parse_args(["--cold", "--no-fetch-process", "--cache-rows", "5"])
    assert (a.cold, a.fetch_process, a.cache_rows) == (True, False, 5)
    assert {s for act in p._actions for s in act.option_strings} == {
        "-h", "--help", "--cold", "--fetch-process", "--no-fetch-process", "--cache-rows"}


def _one_line_usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("engram: error: "), err
    return err


@pytest.mark.parametrize("argv,needles", [
    (["patch", "train", "--ckpt", "R", "--data", "x", "--out", "o", "--steps", "abc"], ["--steps", "'abc'", "int"]),
    (["patch", "train", "--ckpt", "R", "--data", "x", "--out", "o", "--steps", "5.5"], ["--steps", "'5.5'", "int"]),
    (["patch", "train", "--ckpt", "R", "--data", "x", "--out", "o", "--grad-clip", "x"],
     ["--grad-clip", "'x'", "float"]),
    (["eval", "--ckpt", "R", "--data", "D", "--storage", "disk"], ["--storage", "'disk'", "memory"]),
    (["eval", "--ckpt", "R"], ["required", "--data"]),
    (["generate", "--ckpt", "R", "--prompt", "x", "--bogus"], ["unrecognized", "--bogus"]),
    (["nope"], ["invalid choice", "'nope'"]),
])
def test_argparse_errors_are_one_line(argv, needles, capsys):
    err = _one_line_usage_error(argv, capsys)
    for n in needles:
        assert n in err


def test_set_and_list_values_of_the_wrong_type_are_one_line(capsys):
    assert main(["sweep", "account", "--preset", "tiny", "--set", "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err == "engram: error: train.steps='abc': expected an integer\n"
    assert main(["sweep", "account", "--preset", "tiny", "--set", "model.tie_embeddings=0"]) == 2
    assert capsys.readouterr().err == "engram: error: model.tie_embeddings=0: expected true or false\n"
    assert main(["sweep", "plan", "--name", "smoke", "--seeds", "1,x"]) == 2
    assert capsys.readouterr().err.splitlines() == ["engram: error: --seeds '1,x': expected comma-separated "
                                                    "integers, e.g. 1,2,3"]


def test_main_catches_engram_errors_only(monkeypatch, capsys):
    argv = ["bench", "hash", "--repeats", "1"]

    def raising(exc):
        def fn(args):
            raise exc
        return fn

    monkeypatch.setattr(cli_bench, "cmd_bench_hash", raising(EngramError("bad input, fix it")))
    assert main(argv) == 2 and capsys.readouterr().err == "engram: error: bad input, fix it\n"
    monkeypatch.setattr(cli_bench, "cmd_bench_hash", raising(FileNotFoundError("no such file: x")))
    assert main(argv) == 2
    for bug in (ValueError("a bug, not bad input"), KeyError("k")):  # a bug keeps its traceback
        monkeypatch.setattr(cli_bench, "cmd_bench_hash", raising(bug))
        with pytest.raises(type(bug)):
            main(argv)


def test_int_list():
    assert int_list("1,2, 3", "--seeds") == [1, 2, 3]
    with pytest.raises(EngramError, match=r"--ids '1,a': expected comma-separated integers"):
        int_list("1,a", "--ids")


def test_help_does_not_import_torch():
    code = ("import sys; from engram.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV)
    assert out.stdout.strip() == "[]"


def test_wrong_type_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The real process: exit status 2, one stderr line, for a flag and for --set."""
    for argv, needle in ((["patch", "train", "--ckpt", "R", "--data", "x", "--out", "o", "--steps", "abc"],
                          "argument --steps: invalid int value: 'abc'"),
                         (["sweep", "account", "--preset", "tiny", "--set", "train.steps=5.5"],
                          "train.steps=5.5: expected an integer")):
        r = subprocess.run([sys.executable, "-m", "engram", *argv], capture_output=True, text=True, env=ENV)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("engram: error: ") and needle in r.stderr


def test_every_benchmark_is_registered_by_the_bench_module():
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if isinstance(a, argparse._SubParsersAction))
    assert {"hash", "step", "offload", "large-table", "table-optimizer", "train-tiers", "patch", "ngram",
            "ngram-mix", "draft", "retrofit", "distributed"} <= set(bench.choices)
    for name, sub in bench.choices.items():
        assert sub.get_default("fn").__module__ == "engram.cli.bench", name


def test_bench_flags_and_functions_share_their_defaults():
    import inspect

    from engram.bench import config as bc
    from engram.bench.distributed import bench_distributed
    from engram.bench.draft import bench_draft
    from engram.bench.hash import bench_hash
    from engram.bench.ngram import bench_vs_infinigram, mixture_experiment
    from engram.bench.offload import bench_large_table, bench_offload, bench_table_optimizer
    from engram.bench.retrofit import bench_retrofit
    from engram.bench.step import bench_step
    from engram.bench.table_dtype import bench_table_dtype
    from engram.bench.train_tiers import bench_train_tiers

    needed = ("--ckpt", "R", "--data", "D")  # the inputs some subcommands require
    pairs = [(bc.HashBenchConfig, bench_hash, "hash"), (bc.StepBenchConfig, bench_step, "step"),
             (bc.TableOptimizerBenchConfig, bench_table_optimizer, "table-optimizer"),
             (bc.TrainTiersBenchConfig, bench_train_tiers, "train-tiers"),
             (bc.DistributedBenchConfig, bench_distributed, "distributed"),
             (bc.OffloadBenchConfig, bench_offload, "offload"),
             (bc.LargeTableBenchConfig, bench_large_table, "large-table"),
             (bc.NgramBenchConfig, bench_vs_infinigram, "ngram", "--data", "D"),
             (bc.NgramMixBenchConfig, mixture_experiment, "ngram-mix", *needed),
             (bc.DraftBenchConfig, bench_draft, "draft", *needed),
             (bc.RetrofitBenchConfig, bench_retrofit, "retrofit"),
             (bc.TableDtypeBenchConfig, bench_table_dtype, "table-dtype")]
    for cls, fn, name, *inputs in pairs:
        defaults = dataclasses.asdict(cls())
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults, name
        args = build_parser().parse_args(["bench", name, *inputs])
        assert cli_bench._settings(args, cls) == defaults, name
        assert {flag_name(f) for f in dataclasses.fields(cls)} <= flags_of("bench", name), name


def test_bench_flags_set_the_settings_and_old_spellings_still_work():
    def settings(*argv, cls):
        return cli_bench._settings(build_parser().parse_args(["bench", *argv]), cls)

    from engram.bench import config as bc

    s = settings("offload", "--warm", "--batches", "3", "--table-rows", "64", "--standin-tps", "100,2e3",
                 "--no-fetch-process", cls=bc.OffloadBenchConfig)
    assert (s["cold"], s["batches_per_round"], s["rows_per_head"], s["standin_tokens_per_s"], s["process"]) == (
        False, 3, 64, (100.0, 2000.0), False)
    assert settings("offload", "--no-cold", cls=bc.OffloadBenchConfig)["cold"] is False
    assert settings("draft", "--ckpt", "R", "--data", "D", "--ks", "1,3", "5", cls=bc.DraftBenchConfig)["ks"] == (1, 3, 5)
    r = settings("retrofit", "--layers", "1,15", "--table-size", "99", cls=bc.RetrofitBenchConfig)
    assert (r["layers"], r["rows_per_head"]) == ((1, 15), 99)
    m = settings("ngram-mix", "--ckpt", "R", "--data", "D", "--countries", "7", "--results", "out",
                 cls=bc.NgramMixBenchConfig)
    assert (m["n_countries"], m["out_dir"]) == (7, "out")


def test_a_bad_number_list_is_one_line(capsys):
    err = _one_line_usage_error(["bench", "retrofit", "--layers", "1,x"], capsys)
    assert "'1,x'" in err and "integers separated by commas" in err
