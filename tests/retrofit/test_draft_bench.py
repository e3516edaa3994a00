"""``engram bench draft`` on a retrofitted tiny Llama: prompts from a file, the leakage check over
every window, and transformers' prompt lookup beside our drafts, all with greedy output identical."""

import json

import pytest
from tokenizers import Tokenizer

from engram.bench.draft import bench_draft, draft_page, read_prompts_file
from engram.data.shards import load_dataset
from engram.errors import EngramError
from engram.ngram.index import LeakageError, NgramIndex
from engram.retrofit.adapter import save_adapter


@pytest.fixture(scope="module")
def setup(tiny_base, random_retrofit, tmp_path_factory):
    root = tmp_path_factory.mktemp("draftbench")
    model, base = random_retrofit(layers=(1,))
    save_adapter(root / "adapter", model, base)
    model.remove_hooks()
    NgramIndex.from_dataset(root / "idx", tiny_base["data"], progress=False)
    ds = load_dataset(tiny_base["data"])
    tok = Tokenizer.from_file(str(tiny_base["data"] / "tokenizer.json"))
    texts = {split: [tok.decode([int(t) for t in getattr(ds, split).tokens[r * 50:r * 50 + 40]]) for r in range(2)]
             for split in ("train", "val")}
    return {"root": root, "texts": texts}


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_prompt_lookup_and_ngram_drafts_beside_plain_decoding(setup, one_thread):
    root = setup["root"]
    prompts = _write(root / "val.jsonl", setup["texts"]["val"])
    rec = bench_draft(root / "adapter", None, root / "idx", prompts_file=str(prompts), ks=(2,), prompt_lookup=(3,),
                      max_new_tokens=12, repeats=1, progress=False)
    assert list(rec["methods"]) == ["plain", "hf", "prompt-lookup:3", "ngram:2"]
    assert rec["identical"] is True
    assert rec["setup"]["prompts"] == 2
    assert rec["leakage"]["max"] < rec["leakage"]["limit"] and len(rec["leakage"]["longest_match"]) == 2
    for m in ("prompt-lookup:3", "ngram:2"):
        assert 0 <= rec["methods"][m]["acceptance"] <= 1 and rec["methods"][m]["tokens_per_forward"] >= 1
    page = draft_page([rec], "engram bench draft ...")
    assert "`prompt-lookup:3`" in page and f"{rec['methods']['ngram:2']['speedup']['median']:.2f}x" in page
    # the page says how busy the machine was, from the load averages the record took
    quiet = {**rec, "env": {**rec["env"], "load_average": [1.1, 1.0, 0.9]}}
    busy = {**rec, "env": {**rec["env"], "load_average": [9.7, 9.0, 8.8]}}
    assert "alone on a" in draft_page([quiet], "c") and "shared" not in draft_page([quiet], "c")
    assert "on a shared" in draft_page([quiet, busy], "c")


def test_prompts_copied_from_the_index_are_refused(setup, one_thread):
    root = setup["root"]
    leaked = _write(root / "train.jsonl", setup["texts"]["train"])
    with pytest.raises(LeakageError, match="run of"):
        bench_draft(root / "adapter", None, root / "idx", prompts_file=str(leaked), ks=(2,), max_new_tokens=4,
                    repeats=1, progress=False)


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo words\n", encoding="utf-8")
    assert read_prompts_file(tmp_path / "p.txt") == ["one", "two words"]
    _write(tmp_path / "p.jsonl", ["a\nb", "c"])
    assert read_prompts_file(tmp_path / "p.jsonl") == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(EngramError, match="bad.jsonl:2"):
        read_prompts_file(tmp_path / "bad.jsonl")
    with pytest.raises(EngramError, match="cannot read"):
        read_prompts_file(tmp_path / "missing.txt")
