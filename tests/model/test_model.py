"""The Engram layer against DeepSeek's reference forward, and the backbone's invariants."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engram.config import EngramConfig, ModelConfig, preset
from engram.model.layer import EngramLayer
from engram.model.lm import EngramLM
from engram.model.moe import DeepSeekMoE


def _reference_layer(conformance_dir):
    path = conformance_dir / "engram_forward.safetensors"
    tensors = load_file(str(path))
    meta = safe_open(str(path), "pt").metadata()
    cfg = EngramConfig(
        rows_per_head=json.loads(meta["engram_vocab_size"]),
        max_ngram_size=int(meta["max_ngram_size"]),
        n_embed_per_ngram=int(meta["n_embed_per_ngram"]),
        n_head_per_ngram=int(meta["n_head_per_ngram"]),
        layer_ids=(int(meta["layer_id"]),),
        pad_id=int(meta["pad_id"]),
        kernel_size=int(meta["kernel_size"]),
        conv_zero_init=False,
    )
    offsets = tensors["param.multi_head_embedding.offsets"].tolist()
    total = tensors["param.multi_head_embedding.embedding.weight"].shape[0]
    sizes = [b - a for a, b in zip(offsets, offsets[1:] + [total])]
    layer = EngramLayer(cfg, cfg.layer_ids[0], int(meta["hidden_size"]), int(meta["hc_mult"]), sizes)
    layer.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
    return layer, tensors, cfg, meta


def test_engram_layer_matches_reference_forward(conformance_dir):
    layer, t, _, _ = _reference_layer(conformance_dir)
    res = layer(t["input.hidden_states"], t["expected.hash_ids"], output_gates=True)
    torch.testing.assert_close(res.gates, t["expected.gates"], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.output, t["expected.output"], atol=1e-5, rtol=0)
    plain = layer(t["input.hidden_states"], t["expected.hash_ids"])
    assert plain.gates is None and plain.gate_inputs is None and torch.equal(plain.output, res.output)


def test_table_gather_gradient_is_embeddings_bit_for_bit():
    # The Engram table's training gather (one index_add_ in backward) must give exactly the
    # gradient nn.Embedding's backward gives, repeated rows included, and the same rows.
    from engram.model.layer import MultiHeadEmbedding

    torch.manual_seed(0)
    mhe = MultiHeadEmbedding([97, 101, 103], 8)
    ids = torch.randint(0, 97, (3, 40, 3), dtype=torch.int32)
    ids[:, :5] = 7  # many repeats of a few rows
    grad_out = torch.randn(3, 40, 3, 8)
    out = mhe(ids)
    out.backward(grad_out)
    assert out.grad_fn is not None and "TableGather" in type(out.grad_fn).__name__
    ref = torch.nn.functional.embedding(mhe.rows(ids), mhe.embedding.weight)
    (want,) = torch.autograd.grad(ref, mhe.embedding.weight, grad_out)
    assert torch.equal(out, ref) and torch.equal(mhe.embedding.weight.grad, want)
    mhe.embedding.sparse = True  # sparse gradients (SparseRowAdam) keep nn.Embedding's path
    mhe.embedding.weight.grad = None
    mhe(ids).backward(grad_out)
    assert mhe.embedding.weight.grad.is_sparse
    torch.testing.assert_close(mhe.embedding.weight.grad.to_dense(), want)


def test_table_gradient_memory_is_reused_only_when_nothing_holds_it():
    # The gather hands the table gradient's memory out again after weight.grad is dropped (no
    # page faults on a fresh table-sized tensor each step), never while anything still holds it.
    from engram.model.layer import MultiHeadEmbedding

    torch.manual_seed(1)
    mhe = MultiHeadEmbedding([97, 101], 8)
    w = mhe.embedding.weight
    ids = [torch.randint(0, 97, (2, 30, 2), dtype=torch.int32) for _ in range(4)]
    ref = []
    for i in ids:  # nn.Embedding's gradient of each batch, from fresh memory
        out = torch.nn.functional.embedding(mhe.rows(i), w)
        ref.append(torch.autograd.grad(out, w, torch.ones_like(out))[0])

    def backward(i):
        out = mhe(ids[i])
        out.backward(torch.ones_like(out))

    backward(0)
    first = w.grad.data_ptr()
    assert torch.equal(w.grad, ref[0])
    w.grad = None
    backward(1)  # reused, zeroed: exactly batch 1's gradient, bit for bit
    assert w.grad.data_ptr() == first and torch.equal(w.grad, ref[1])
    held = w.grad
    w.grad = None
    backward(2)  # the previous gradient is still referenced: fresh memory, `held` untouched
    assert w.grad.data_ptr() != held.data_ptr() and torch.equal(held, ref[1]) and torch.equal(w.grad, ref[2])
    backward(3)  # no zero_grad: accumulated into the existing gradient
    torch.testing.assert_close(w.grad, ref[2] + ref[3], rtol=0, atol=0)


def test_engram_layer_hashes_match_reference(conformance_dir):
    from engram.hashing.hasher import NgramHasher

    layer, t, cfg, meta = _reference_layer(conformance_dir)
    lookup = t["input.compression_lookup"].numpy()
    hasher = NgramHasher(cfg, int(meta["tokenizer_vocab_size"]), lookup)
    assert hasher.head_sizes(cfg.layer_ids[0]) == layer.multi_head_embedding.head_sizes
    ids = hasher.hash(t["input.input_ids"])[cfg.layer_ids[0]]
    assert torch.equal(ids, t["expected.hash_ids"])


def test_engram_layer_conv_state_matches_full_sequence(conformance_dir):
    layer, t, _, _ = _reference_layer(conformance_dir)
    h, ids = t["input.hidden_states"], t["expected.hash_ids"]
    full = layer(h, ids).output
    state, parts = None, []
    for s in range(0, h.shape[1], 7):  # uneven chunks exercise the rolling conv state
        res = layer(h[:, s:s + 7], ids[:, s:s + 7], state)
        state = res.conv_state
        parts.append(res.output)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_zero_init_conv_and_disabled_layer(conformance_dir):
    layer, t, cfg, meta = _reference_layer(conformance_dir)
    layer.short_conv.zero_init = True
    layer.short_conv.reset_parameters()
    out = layer(t["input.hidden_states"], t["expected.hash_ids"]).output
    v = t["expected.gates"].unsqueeze(-1)  # with a zero conv the output is the gated value alone
    e = layer.multi_head_embedding(t["expected.hash_ids"]).flatten(-2)
    torch.testing.assert_close(out, v * layer.value_proj(e).unsqueeze(2), atol=1e-5, rtol=0)
    off = layer(t["input.hidden_states"], t["expected.hash_ids"], zero_output=True, output_gates=True)
    assert torch.count_nonzero(off.output) == 0
    torch.testing.assert_close(off.gates, t["expected.gates"], atol=1e-5, rtol=0)  # the gate still runs


@pytest.mark.parametrize("name,hc", [("tiny", 1), ("tiny", 4), ("tiny-dense", 1), ("tiny-dense", 2)])
def test_kv_cache_decoding_matches_full_forward(name, hc):
    torch.manual_seed(0)
    cfg = preset(name, 300)
    cfg.hc_mult = hc
    model = EngramLM(ModelConfig.from_dict(cfg.to_dict())).eval()
    for e in model.engram_layers:  # non-zero conv so the rolling state matters
        torch.nn.init.normal_(e.short_conv.conv.weight, std=0.3)
    ids = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :9], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 17)]
        parts.append(model(ids[:, 17:], cache=cache).logits)  # a multi-token chunk after decode
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def _trained_like(hc: int = 2) -> EngramLM:
    """A tiny model whose gate keys and conv are not at init, so gates vary by position."""
    torch.manual_seed(0)
    cfg = preset("tiny", 300)
    cfg.hc_mult = hc
    cfg.engram.layer_ids = (0, 1)
    model = EngramLM(cfg).eval()
    for e in model.engram_layers:
        torch.nn.init.normal_(e.short_conv.conv.weight, std=0.3)
    return model


def test_output_gates_are_the_gates_each_layer_computes():
    model = _trained_like()
    ids = torch.randint(0, 300, (2, 19))
    seen: dict[int, tuple] = {}  # what each layer received, taken by a hook, not by the model
    hooks = [e.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.layer_id, args))
             for e in model.engram_layers]
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, output_gates=True, output_gate_inputs=True)
    for h in hooks:
        h.remove()
    assert plain.gates is None and plain.gate_inputs is None  # only when asked for
    assert torch.equal(plain.logits, out.logits)  # asking changes nothing else
    assert set(out.gates) == set(out.gate_inputs) == {0, 1}
    for e in model.engram_layers:
        hidden, hash_ids = seen[e.layer_id][:2]
        with torch.no_grad():
            want = e.gates(hidden, e.multi_head_embedding(hash_ids).flatten(-2))
        assert out.gates[e.layer_id].shape == (2, 19, 2)
        assert torch.equal(out.gates[e.layer_id], want)
        h, mem = out.gate_inputs[e.layer_id]
        assert torch.equal(h, hidden) and torch.equal(e.gates(h, mem), want)
    dense = EngramLM(preset("tiny-dense", 300))
    assert dense(ids, output_gates=True).gates == {}  # no Engram layers: no gates


def test_output_gates_with_the_kv_cache_cover_the_new_positions():
    model = _trained_like()
    ids = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        full = model(ids, output_gates=True).gates
        cache = model.new_cache(2)
        parts = [model(ids[:, :9], cache=cache, output_gates=True).gates]
        parts += [model(ids[:, t:t + 1], cache=cache, output_gates=True).gates for t in range(9, 15)]
    for lid, g in full.items():
        torch.testing.assert_close(torch.cat([p[lid] for p in parts], 1), g, atol=1e-5, rtol=1e-5)


def test_hc_mult_one_is_a_plain_residual_stream():
    model = EngramLM(preset("tiny", 300))
    assert all(b.hc_attn is None and b.hc_ffn is None for b in model.layers)
    assert not any("hc_" in n for n, _ in model.named_parameters())


def test_moe_bias_moves_load_towards_balance():
    torch.manual_seed(0)
    moe = DeepSeekMoE(16, 8, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=1,
                      bias_update_speed=0.02)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
        moe.router.weight[0] += 0.3  # expert 0 wins for most inputs (they have a positive sum)
    x = torch.rand(512, 16) + 0.1
    moe.train()
    moe(x)
    first = moe.update_bias()
    assert first.argmax() == 0 and first[0] > 0.5 * 512
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1]
    loads = []
    for _ in range(200):
        moe(x)
        loads.append(moe.update_bias())
    late = torch.stack(loads[-50:]).mean(0)
    assert late.max() < 0.5 * first.max()  # the bias alone spread the load
    assert late.min() > 0


def test_moe_matches_dense_loop():
    torch.manual_seed(0)
    moe = DeepSeekMoE(16, 8, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1,
                      bias_update_speed=0.0).eval()
    x = torch.randn(3, 7, 16)
    idx, w = moe.route(x.reshape(-1, 16))
    want = torch.stack([sum(w[n, j] * moe.experts[int(idx[n, j])](x.reshape(-1, 16)[n])
                            for j in range(2)) for n in range(21)]) + moe.shared(x.reshape(-1, 16))
    torch.testing.assert_close(moe(x).reshape(-1, 16), want, atol=1e-5, rtol=1e-5)


def test_bad_token_ids_are_refused():
    model = EngramLM(preset("tiny", 300))
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_table_init_std_is_applied():
    cfg = preset("tiny", 300)
    cfg.engram.table_init_std = 0.5
    torch.manual_seed(0)
    model = EngramLM(cfg)
    table = model.table_parameters()[0]
    assert 0.45 < table.std().item() < 0.55
    assert all(torch.count_nonzero(e.short_conv.conv.weight) == 0 for e in model.engram_layers)
