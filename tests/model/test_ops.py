"""The Engram layer's hand-written backward passes (engram.model.ops) against what they replace.

Where the arithmetic is the same the tests ask for equal bits; where the sums run in another
order (the hand-written gradients, the conv as shifted multiply-adds instead of oneDNN's kernel)
they ask for float32 agreement within a few ulps of the values' scale, and agreement to 1e-12
in float64, which no mistake in the formulas would survive.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram.config import EngramConfig
from engram.model.layer import EngramLayer
from engram.model.ops import causal_conv_silu, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(fn, *inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_forward_is_torchs_bit_for_bit_and_its_gradient_agrees(eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 3, 64, generator=g) * 3
    w = torch.randn(64, generator=g)
    gy = torch.randn(4, 9, 64, generator=g)
    ref = lambda x, w: F.rms_norm(x[:, :, 1], (64,), w, eps)  # a strided branch slice, as the layer reads
    new = lambda x, w: rms_norm(x[:, :, 1], w, eps)
    y0, (gx0, gw0) = _grads(ref, x, w, grad_out=gy)
    y1, (gx1, gw1) = _grads(new, x, w, grad_out=gy)
    assert torch.equal(y0, y1)  # same ops in the same order as torch's composite forward
    assert "RMSNorm" in type(new(x.requires_grad_(), w).grad_fn).__name__
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
    y0, (gx0, gw0) = _grads(ref, x.double(), w.double(), grad_out=gy.double())
    y1, (gx1, gw1) = _grads(new, x.double(), w.double(), grad_out=gy.double())
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradient: torch's own function
        assert torch.equal(rms_norm(x[:, :, 1], w, eps), F.rms_norm(x[:, :, 1], (64,), w, eps))


def _conv1d_silu(x, weight, dilation, history=None):
    """What ShortConv computed before: Conv1d over the zero-padded, transposed sequence."""
    B, T, C = x.shape
    R = (weight.shape[-1] - 1) * dilation
    if history is None:
        history = x.new_zeros(B, R, C)
    seq = torch.cat([history, x], dim=1).transpose(1, 2).contiguous()
    return F.silu(F.conv1d(seq, weight, dilation=dilation, groups=C)).transpose(1, 2)


@pytest.mark.parametrize("T", [40, 5])  # 5: shorter than the receptive field (9)
def test_causal_conv_silu_matches_conv1d(T):
    g = torch.Generator().manual_seed(1)
    B, C, K, d = 3, 24, 4, 3
    x = torch.randn(B, T, C, generator=g)
    w = torch.randn(C, 1, K, generator=g) * 0.5
    gy = torch.randn(B, T, C, generator=g)
    new = lambda x, w: causal_conv_silu(x, w, d)
    y0, (gx0, gw0) = _grads(lambda x, w: _conv1d_silu(x, w, d), x, w, grad_out=gy)
    y1, (gx1, gw1) = _grads(new, x, w, grad_out=gy)
    assert "CausalConvSiLU" in type(new(x.requires_grad_(), w).grad_fn).__name__
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
    y0, (gx0, gw0) = _grads(lambda x, w: _conv1d_silu(x, w, d), x.double(), w.double(), grad_out=gy.double())
    y1, (gx1, gw1) = _grads(new, x.double(), w.double(), grad_out=gy.double())
    for a, b in ((y1, y0), (gx1, gx0), (gw1, gw0)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_conv_silu_with_history_is_the_full_sequence_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    B, T, C, K, d = 2, 30, 16, 4, 3
    R = (K - 1) * d
    x = torch.randn(B, T, C, generator=g)
    w = torch.randn(C, 1, K, generator=g)
    full = causal_conv_silu(x, w, d)
    hist, parts = x.new_zeros(B, R, C), []
    for s in range(0, T, 7):  # chunks with their history: every sum has the same terms in the same order
        chunk = x[:, s:s + 7]
        parts.append(causal_conv_silu(chunk, w, d, hist))
        hist = torch.cat([hist, chunk], dim=1)[:, -R:]
    assert torch.equal(torch.cat(parts, dim=1), full)
    torch.testing.assert_close(causal_conv_silu(x[:, 10:], w, d, x[:, 1:10]),
                               _conv1d_silu(x[:, 10:], w, d, x[:, 1:10]), rtol=1e-6, atol=1e-6)


def _previous_forward(layer: EngramLayer, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """EngramLayer.forward as it was written with nn modules (norm modules, Conv1d), for comparison."""
    e = F.embedding(layer.multi_head_embedding.rows(ids), layer.table.weight).flatten(-2)
    B, T, M, D = h.shape
    gates = []
    for m in range(M):
        k = layer.norm1[m](layer.key_projs[m](e))
        q = layer.norm2[m](h[:, :, m])
        g = (k * q).sum(dim=-1) / D ** 0.5
        gates.append((g.abs().clamp_min(1e-6).sqrt() * g.sign()).sigmoid())
    value = torch.stack(gates, -1).unsqueeze(-1) * layer.value_proj(e).unsqueeze(2)
    sc = layer.short_conv
    normed = torch.cat([sc.norms[m](value[:, :, m]) for m in range(M)], dim=-1)
    seq = torch.cat([normed.new_zeros(B, sc.receptive, M * D), normed], dim=1)
    y = F.silu(sc.conv(seq.transpose(1, 2).contiguous())).transpose(1, 2)
    return value + y.reshape(B, T, M, D)


@pytest.mark.parametrize("hc_mult", [1, 3])
def test_engram_layer_training_step_matches_the_previous_computation(hc_mult):
    # Output and every gradient of a training forward/backward, against the nn-module version.
    torch.manual_seed(3)
    cfg = EngramConfig(rows_per_head=(211, 223), n_embed_per_ngram=32, n_head_per_ngram=2,
                       layer_ids=(1,), pad_id=0, conv_zero_init=False)
    D = 48
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        layer = EngramLayer(cfg, 1, D, hc_mult, [211, 223, 227, 229]).to(dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        h = torch.randn(2, 17, hc_mult, D, dtype=dtype)
        ids = torch.randint(0, 211, (2, 17, 4), dtype=torch.int32)
        gout = torch.randn(2, 17, hc_mult, D, dtype=dtype)
        results = []
        for fn in (lambda h: _previous_forward(layer, h, ids), lambda h: layer(h, ids).output):
            layer.zero_grad(set_to_none=True)
            hh = h.clone().requires_grad_()
            out = fn(hh)
            out.backward(gout)
            results.append([out.detach(), hh.grad] + [p.grad for p in layer.parameters()])
        assert len(results[1]) == 2 + len(list(layer.parameters()))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
