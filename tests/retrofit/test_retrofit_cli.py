"""The retrofit commands, and an adapter as --ckpt of the existing tools, on the tiny Llama."""

import hashlib
import json

import pytest

from engram.cli.main import main


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    rc = main(["retrofit", "train", "--base", str(tiny_base["base"]), "--data", str(tiny_base["data"]),
               "--layers", "0,2", "--out", str(out), "--rows-per-head", "997", "--n-embed-per-ngram", "32",
               "--n-head-per-ngram", "2", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
               "--eval-every", "2", "--eval-batches", "1", "--quiet"])
    assert rc == 0
    return out


def test_train_eval_generate(adapter, tiny_base, capsys, one_thread):
    capsys.readouterr()
    assert main(["retrofit", "eval", "--ckpt", str(adapter), "--data", str(tiny_base["data"]),
                 "--max-batches", "2", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["base_loss"] > 0 and res["delta_loss"] == pytest.approx(res["loss"] - res["base_loss"])
    assert main(["retrofit", "generate", "--ckpt", str(adapter), "--prompt", "the cat sat", "--quiet",
                 "--max-new-tokens", "8"]) == 0
    ours = capsys.readouterr().out
    assert main(["retrofit", "generate", "--ckpt", str(adapter), "--prompt", "the cat sat", "--quiet",
                 "--max-new-tokens", "8", "--hf-generate"]) == 0
    assert capsys.readouterr().out == ours  # greedy: our cached loop and transformers' agree
    assert ours.startswith("the cat sat")
    # several prompts, one left-padded batch: each row as it is alone, in both loops
    args = ["retrofit", "generate", "--ckpt", str(adapter), "--quiet", "--max-new-tokens", "8",
            "--prompt", "the dog ran far away from the", "--prompt", "the cat sat"]
    assert main(args) == 0
    batched = capsys.readouterr().out
    assert main(["retrofit", "generate", "--ckpt", str(adapter), "--quiet", "--max-new-tokens", "8",
                 "--prompt", "the dog ran far away from the"]) == 0
    assert batched == f"--- 1/2\n{capsys.readouterr().out}--- 2/2\n{ours}"
    assert main(args + ["--hf-generate"]) == 0
    assert capsys.readouterr().out == batched


def test_a_bare_resume_continues_the_recorded_adapter(adapter, tiny_base, tmp_path, capsys, one_thread):
    """retrofit train --resume takes the adapter's recorded settings (not the flags' defaults);
    only the train values a resume may change can be given, a change of steps is one line."""
    import shutil

    run = tmp_path / "a"
    shutil.copytree(adapter, run)
    bare = ["retrofit", "train", "--data", str(tiny_base["data"]), "--out", str(run), "--resume", "--quiet"]
    capsys.readouterr()
    assert main(bare) == 0  # the defaults (--layers 1, --steps 200, ...) would be refused or run on
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 4 and err == ""
    assert main([*bare, "--steps", "5"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 5 and err.count("\n") == 1 and "train.steps 4 -> 5" in err
    before = (run / "adapter_config.json").read_bytes()
    for extra, key in ((["--rows-per-head", "499"], "retrofit.rows_per_head=499 cannot change"),
                       (["--layers", "1"], "retrofit.layers=[1] cannot change"),
                       (["--lr", "0.5"], "train.lr=0.5 cannot change")):
        assert main([*bare, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("engram: error:") and err.count("\n") == 1 and key in err, err
    assert (run / "adapter_config.json").read_bytes() == before


def test_existing_tools_take_an_adapter(adapter, tiny_base, tmp_path, capsys, one_thread):
    data = str(tiny_base["data"])
    assert main(["eval", "--ckpt", str(adapter), "--data", data, "--max-batches", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", "--ckpt", str(adapter), "--data", data, "--max-batches", "1", "--storage", "mmap"]) == 0
    mapped = json.loads(capsys.readouterr().out)
    assert mapped["loss"] == plain["loss"] and mapped["tables"]["storage"] == "mmap"
    assert main(["generate", "--ckpt", str(adapter), "--prompt", "the dog", "--temperature", "0",
                 "--max-new-tokens", "6", "--storage", "cached", "--cache-rows", "64"]) == 0
    assert capsys.readouterr().out.startswith("the dog")
    assert main(["inspect", "--ckpt", str(adapter), "--text", "the cat sat on a mat", "--json",
                 str(tmp_path / "g.json"), "--quiet"]) == 0
    gates = json.loads((tmp_path / "g.json").read_text())
    assert gates and "tokens" in json.dumps(gates)


def test_patch_train_apply_revert_on_an_adapter(adapter, tmp_path, capsys, one_thread):
    import shutil

    table = tmp_path / "tables.engt"
    shutil.copyfile(adapter / "tables.engt", table)
    before = hashlib.sha256(table.read_bytes()).hexdigest()
    facts = tmp_path / "facts.txt"
    facts.write_text("the red bird sang near the old house\n")
    assert main(["patch", "train", "--ckpt", str(adapter), "--data", str(facts), "--out", str(tmp_path / "p.engp"),
                 "--steps", "5", "--quiet"]) == 0
    assert main(["patch", "apply", str(table), str(tmp_path / "p.engp")]) == 0
    assert hashlib.sha256(table.read_bytes()).hexdigest() != before
    assert main(["patch", "revert", str(table), str(tmp_path / "p.engp")]) == 0
    assert hashlib.sha256(table.read_bytes()).hexdigest() == before


def test_bench_retrofit_json(tiny_base, capsys, one_thread, page_from_runs):
    assert main(["bench", "retrofit", "--base", str(tiny_base["base"]), "--batch-size", "1", "--seq-len", "16",
                 "--repeats", "2", "--train-steps", "1", "--rows-per-head", "997", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("overhead", "base_tokens_per_s", "retrofit_tokens_per_s", "train_tokens_per_s"):
        assert res[key] is not None and res[key] == res[key]
    assert res["base_tokens_per_s"] > 0 and res["retrofit_tokens_per_s"] > 0
    assert "lora_tokens_per_s" not in res
    # With --lora-rank: LoRA alone and LoRA + Engram, and the base object is left as it was.
    assert main(["bench", "retrofit", "--base", str(tiny_base["base"]), "--batch-size", "1", "--seq-len", "16",
                 "--repeats", "2", "--train-steps", "1", "--rows-per-head", "997", "--lora-rank", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("lora_tokens_per_s", "both_tokens_per_s", "lora_train_tokens_per_s", "both_train_tokens_per_s"):
        assert res[key] > 0, key
    assert res["lora_params"] > 0 and res["lora_overhead"] == res["lora_overhead"]
    assert res["timing"].startswith("one loop, rounds rotating over base, engram, lora, both")
    # runs already measured, rendered as a page: one row per run, every overhead against its base
    runs = [res, {**res, "overhead": 0.5, "overhead_spread": {"median": 0.5, "min": 0.25, "max": 0.75}}]
    text = page_from_runs("retrofit", runs, "engram bench retrofit --lora-rank 2 --json")
    assert "Machine: M." in text and "`engram bench retrofit --lora-rank 2 --json`" in text
    assert text.count("\n| ") == 1 + 2 and f"| 2 | {res['base_tokens_per_s']:,.0f} |" in text
    assert f"Engram: overhead medians {100 * res['overhead']:+.1f}%, +50.0% over 2 runs" in text
    assert "(+50.0%; +25.0% to +75.0%)" in text and "LoRA r2: overhead medians" in text and "LoRA + Engram" in text


def test_bench_retrofit_times_every_mode_in_one_rotating_loop():
    """Each round runs every mode once (so one base timing serves every overhead), the order rotates,
    and the untimed first round is dropped."""
    import contextlib

    from engram.bench.retrofit import _interleaved

    seen, active = [], []

    def mode(name):
        @contextlib.contextmanager
        def ctx():
            active.append(name)
            yield
            active.pop()
        return ctx

    times = _interleaved(lambda x: seen.append(active[-1]), None, {m: mode(m) for m in ("base", "engram", "lora")}, 3)
    assert seen == ["base", "engram", "lora", "engram", "lora", "base", "lora", "base", "engram",
                    "base", "engram", "lora"]
    assert {m: len(s) for m, s in times.items()} == {"base": 3, "engram": 3, "lora": 3}


def test_bad_adapter_input_is_one_line(tiny_base, tmp_path, capsys):
    assert main(["retrofit", "eval", "--ckpt", str(tmp_path), "--data", str(tiny_base["data"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram: error:") and "not a retrofit adapter" in err and "\n" not in err
    assert main(["retrofit", "train", "--base", str(tiny_base["base"]), "--data", str(tiny_base["data"]),
                 "--layers", "7", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "out of range; the base has 3 decoder layers" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_ngram_mixture_on_an_adapter(adapter, tiny_base, tmp_path, capsys, one_thread):
    data = str(tiny_base["data"])
    assert main(["ngram", "build", "--data", data, "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(adapter), "--data", data, "--max-batches", "1", "--ngram", str(tmp_path / "idx"),
                 "--ngram-lambda", "0.3", "--allow-indexed-text"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mixture"]["loss"] > 0 and res["model"]["loss"] > 0
    assert main(["generate", "--ckpt", str(adapter), "--prompt", "the cat", "--temperature", "0",
                 "--max-new-tokens", "5", "--ngram", str(tmp_path / "idx"), "--ngram-lambda", "0.3"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_generate_with_drafts_on_an_adapter(adapter, tiny_base, tmp_path, capsys, one_thread):
    assert main(["ngram", "build", "--data", str(tiny_base["data"]), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    capsys.readouterr()
    common = ["generate", "--ckpt", str(adapter), "--prompt", "the cat sat on", "--temperature", "0",
              "--max-new-tokens", "12"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--draft", "ngram:4", "--index", str(tmp_path / "idx")]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == plain and "acceptance" in drafted.err
