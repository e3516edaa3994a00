"""The command line end to end on a tiny dataset: prepare, train, resume, eval, generate."""

import json

import pytest

from engram.cli.main import main
from engram.model.checkpoint import read_config

TEXT = ("The capital of France is Paris. The capital of Spain is Madrid. "
        "To be, or not to be, that is the question. In the beginning was the Word. ") * 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for i in range(4):
        (root / f"doc{i}.txt").write_text(TEXT + f" Document number {i}.")
    data = root / "data"
    assert main(["data", "prepare", "--out", str(data), "--no-builtin", "--vocab-size", "300",
                 "--files", *[str(root / f"doc{i}.txt") for i in range(4)], "--val-fraction", "0.3"]) == 0
    return root, data


def test_prepare_train_eval_generate(prepared, capsys):
    root, data = prepared
    run = root / "run"
    common = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--quiet",
              "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.eval_every=5",
              "--set", "train.eval_batches=2", "--set", "train.save_every=5"]
    assert main(common + ["--set", "train.steps=5"]) == 0
    assert main(common + ["--set", "train.steps=10", "--resume"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("{\n  \""):])  # the second (resumed) summary
    assert summary["steps"] == 10 and summary["resumed_from"] == 5

    assert main(["eval", "--ckpt", str(run), "--data", str(data), "--max-batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and result["perplexity"] > 1

    assert main(["generate", "--ckpt", str(run), "--prompt", "The capital of", "--max-new-tokens", "8",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The capital of")
    main(["generate", "--ckpt", str(run), "--prompt", "The capital of", "--max-new-tokens", "8", "--seed", "3"])
    assert capsys.readouterr().out == first  # seeded sampling is reproducible

    # several prompts of different lengths, one batch: greedy, each as if alone
    greedy = ["--ckpt", str(run), "--max-new-tokens", "6", "--temperature", "0"]
    prompts = ["The capital of", "a", "the cat sat on the mat and"]
    alone = []
    for p in prompts:
        assert main(["generate", *greedy, "--prompt", p]) == 0
        alone.append(capsys.readouterr().out)
    (root / "prompts.txt").write_text(prompts[2] + "\n\n")
    assert main(["generate", *greedy, "--prompt", prompts[0], "--prompt", prompts[1],
                 "--prompts-file", str(root / "prompts.txt")]) == 0
    batched = capsys.readouterr().out
    assert batched == "".join(f"--- {i + 1}/3\n{text}" for i, text in enumerate(alone))
    assert main(["generate", "--ckpt", str(run)]) == 2
    assert "no prompt given" in capsys.readouterr().err


def test_a_bare_resume_continues_the_recorded_run(prepared, tmp_path, capsys):
    """--resume takes the configs the run recorded (not the defaults), only mutable values given
    on the command line change them, a change of steps is one stderr line, and a refused change
    leaves config.json as it was."""
    root, data = prepared
    run = tmp_path / "r"
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--quiet",
                 "--set", "train.steps=4", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
                 "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
                 "--max-seconds", "1e-9"]) == 0  # stops (and saves) after its first step
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["stopped_early"] and stopped["steps"] < 4
    recorded = json.loads((run / "config.json").read_text())

    bare = ["train", "--data", str(data), "--out", str(run), "--resume", "--quiet"]
    assert main(bare) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["steps"], summary["target_steps"], summary["resumed_from"]) == (4, 4, stopped["steps"])
    assert err == ""  # nothing changed, nothing to say
    now = json.loads((run / "config.json").read_text())
    assert (now["model"], now["train"]) == (recorded["model"], recorded["train"])

    assert main([*bare, "--set", "train.steps=6"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 6
    assert err.count("\n") == 1 and "train.steps 4 -> 6" in err and "cosine schedule" in err
    assert read_config(run).train_config.steps == 6

    before = (run / "config.json").read_bytes()
    for extra, key in ((["--set", "train.lr=0.5"], "train.lr=0.5 cannot change"),
                       (["--set", "model.hidden_size=48"], "model.hidden_size=48 cannot change"),
                       (["--set", "engram.max_ngram_size=2"], "engram.max_ngram_size=2 cannot change"),
                       (["--preset", "tiny-dense"], "--preset tiny-dense does not describe the model")):
        assert main([*bare, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("engram: error:") and err.count("\n") == 1 and key in err, err
    assert (run / "config.json").read_bytes() == before


def test_bad_inputs_give_one_line_errors(prepared, tmp_path, capsys):
    root, data = prepared
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--set", "model.hidden_sise=3"]) == 2
    assert "unknown model key 'hidden_sise'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("engram: error:")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), "--no-builtin",
                 "--files", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and not (tmp_path / "d" / "meta.json").exists()


@pytest.mark.parametrize("value,shown", [("abc", "'abc'"), ("5.5", "5.5")])
def test_train_set_of_the_wrong_type_is_one_line(prepared, tmp_path, capsys, value, shown):
    root, data = prepared
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--set", f"train.steps={value}"]) == 2
    assert capsys.readouterr().err == f"engram: error: train.steps={shown}: expected an integer\n"
    assert not (tmp_path / "r").exists()


def test_bench_hash_json(capsys):
    assert main(["bench", "hash", "--json", "--batch-size", "1", "--seq-len", "256", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "hash"
    assert set(result) >= {"tokens_per_s", "baseline_tokens_per_s", "ratio"}
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])


def test_training_into_an_existing_run_needs_resume_or_overwrite(prepared, capsys):
    root, data = prepared
    args = ["train", "--data", str(data), "--out", str(root / "run2"), "--preset", "tiny-dense", "--quiet",
            "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
            "--set", "train.eval_batches=1"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_train_table_storage_flags(prepared, tmp_path, capsys):
    """--table-storage cached with dense Adam is refused in one line naming the fix; with the
    row-sparse optimizer it trains, and the checkpoint records the tier."""
    root, data = prepared
    base = ["train", "--data", str(data), "--preset", "tiny", "--quiet", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set", "train.eval_batches=1"]
    assert main([*base, "--out", str(tmp_path / "r"), "--table-storage", "cached"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "table_storage='cached' trains with the row-sparse optimizer" in err
    assert "--set train.table_optimizer=sparse_adam" in err
    run = tmp_path / "c"
    assert main([*base, "--out", str(run), "--table-storage", "cached", "--table-cache-rows", "50",
                 "--set", "train.table_optimizer=sparse_adam"]) == 0
    saved = read_config(run).train_config.to_dict()
    assert (saved["table_storage"], saved["table_cache_rows"]) == ("cached", 50)
    assert not (run / "table-work").exists()
