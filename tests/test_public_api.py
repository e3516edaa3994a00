"""The package's front door: ``import engram`` is light, and every exported name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import engram


def test_import_engram_does_not_load_torch() -> None:
    code = "import sys, engram; print('torch' in sys.modules, engram.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", engram.__version__]


@pytest.mark.parametrize("name", [n for n in engram.__all__ if n != "__version__"])
def test_every_export_resolves_to_its_defining_module(name: str) -> None:
    obj = getattr(engram, name)
    assert obj is getattr(sys.modules[engram._EXPORTS[name]], name)
    assert name in dir(engram)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'EngramLLM'"):
        engram.EngramLLM  # noqa: B018


def test_readme_example_runs() -> None:
    import torch

    from engram import EngramLM, preset

    model = EngramLM(preset("tiny", vocab_size=300))
    out = model(torch.randint(0, 300, (2, 16)), targets=torch.randint(0, 300, (2, 16)))
    out.loss.backward()
    assert out.logits.shape == (2, 16, 300) and torch.isfinite(out.loss)
