"""engram.load / engram.save on training runs: the kind is read from disk, save round-trips,
tables can be served from a file, and paths that hold no model are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engram
from engram.auto.loader import LoadError, ModelKind, model_kind
from engram.cli.main import main
from engram.config import SamplingConfig, StorageConfig
from engram.errors import NotFoundError
from engram.model.generation import generate
from engram.model.lm import EngramLM
from engram.model.protocol import LanguageModel
from engram.tables.convert import export_checkpoint_tables
from engram.tables.runtime import table_runtime

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    data = tiny.dataset(root / "data")
    saved = tiny.save_run(root / "run", data)
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"root": root, "run": root / "run", "data": data, "saved": saved, "ids": ids}


def test_a_run_directory_opens_as_engram_lm_with_its_meta_and_tokenizer(world):
    model = engram.load(world["run"])
    assert isinstance(model, EngramLM) and isinstance(model, LanguageModel)
    src = model.loaded_from
    assert src.kind == ModelKind.RUN and src.path == world["run"]
    assert src.train_config.seq_len == 32 and src.tokenizer is not None
    assert src.tokenizer_fingerprint == src.meta.tokenizer_fingerprint is not None
    with torch.no_grad():
        assert torch.equal(model(world["ids"]).logits, world["saved"](world["ids"]).logits)


def test_generate_is_a_method_of_the_model(world):
    model = engram.load(world["run"])
    prompt = world["ids"][:1, :5]
    assert torch.equal(model.generate(prompt, GREEDY), generate(model, prompt, GREEDY))


def test_save_writes_a_run_that_loads_back_the_same(world, tmp_path):
    model = engram.load(world["run"])
    out = engram.save(model, tmp_path / "copy")
    again = engram.load(out)
    assert model_kind(out) == ModelKind.RUN
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert (out / "tokenizer.json").read_bytes() == (world["run"] / "tokenizer.json").read_bytes()
    assert again.loaded_from.train_config == model.loaded_from.train_config
    assert again.loaded_from.tokenizer_fingerprint == model.loaded_from.tokenizer_fingerprint
    assert not (out / "trainer_state.json").exists()  # weights only


def test_tables_served_from_a_file_give_the_same_logits_and_refuse_to_save(world, tmp_path):
    table = tmp_path / "t.engt"
    export_checkpoint_tables(world["run"], table)
    model = engram.load(world["run"], storage=StorageConfig(path=str(table), kind="mmap", prefetch=False))
    try:
        with torch.no_grad():
            assert torch.equal(model(world["ids"]).logits, world["saved"](world["ids"]).logits)
        with pytest.raises(LoadError, match="served from a file"):
            engram.save(model, tmp_path / "x")
    finally:
        table_runtime(model).close()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["missing", "file", "empty", "hf-dir"])
def test_a_path_without_a_model_is_a_one_line_error(world, tmp_path, capsys, case):
    path = tmp_path / "p"
    if case == "file":
        path.write_text("x")
    elif case in ("empty", "hf-dir"):
        path.mkdir()
        if case == "hf-dir":  # a Hugging Face model directory: config.json of another format
            (path / "config.json").write_text('{"model_type": "llama"}')
    err = NotFoundError if case == "missing" else engram.EngramError
    with pytest.raises(err):
        engram.load(path)
    assert main(["generate", "--ckpt", str(path), "--prompt", "the cat"]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg.startswith("engram: error:") and "\n" not in msg and str(path) in msg


def test_requests_that_do_not_fit_the_directory_are_refused(world):
    with pytest.raises(LoadError, match="base=.*applies to retrofit adapters"):
        engram.load(world["run"], base="smollm2-135m")
    model = engram.load(world["run"])
    with pytest.raises(LoadError, match="cannot save over"):
        engram.save(model, world["run"])


def test_opening_a_run_does_not_import_transformers(world):
    code = ("import sys, engram; engram.load(sys.argv[1]); "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    src = str(Path(engram.__file__).parents[1])
    r = subprocess.run([sys.executable, "-c", code, str(world["run"])], capture_output=True, text=True,
                       env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
