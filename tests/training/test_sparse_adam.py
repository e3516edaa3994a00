"""Row-sparse Adam: equal to dense Adam on rows touched every step, state grows with rows touched."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import TrainConfig, preset
from engram.training.sparse_adam import SparseRowAdam, clip_grad_norm_, use_sparse_table_grads
from engram.training.trainer import build_optimizers, train

pytestmark = pytest.mark.usefixtures("one_thread")

R, D = 120, 8


def _steps(betas, lr, wd, n_steps, seed, always=10):
    """Dense Adam and SparseRowAdam on the same gradients; rows < ``always`` are hit every step."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(R, D, generator=g)
    dense, sparse = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    od = torch.optim.Adam([dense], lr=lr, betas=betas, weight_decay=wd)
    osp = SparseRowAdam([sparse], lr=lr, betas=betas, weight_decay=wd)
    for step in range(n_steps):
        rows = torch.cat([torch.arange(always), torch.randint(always, R, (15,), generator=g)]).unique()
        grad = torch.zeros(R, D)
        grad[rows] = torch.randn(rows.numel(), D, generator=g)
        dense.grad = grad.clone()
        # The sparse gradient as an embedding produces it: uncoalesced, rows repeated.
        idx = torch.cat([rows, rows])
        vals = torch.cat([grad[rows] * 0.25, grad[rows] * 0.75])
        sparse.grad = torch.sparse_coo_tensor(idx[None], vals, (R, D), check_invariants=True)
        for opt in (od, osp):
            for group in opt.param_groups:
                group["lr"] = lr * (1 + step % 3)  # a schedule, as in training
        od.step()
        osp.step()
    return dense, sparse, osp, always


@settings(max_examples=25, deadline=None)
@given(b1=st.sampled_from([0.0, 0.8, 0.9]), b2=st.sampled_from([0.95, 0.999]),
       lr=st.floats(1e-4, 5e-2), wd=st.sampled_from([0.0, 0.01]), n=st.integers(1, 12),
       seed=st.integers(0, 1000))
def test_equals_dense_adam_on_rows_touched_every_step(b1, b2, lr, wd, n, seed):
    dense, sparse, _, always = _steps((b1, b2), lr, wd, n, seed)
    # 0.25 g + 0.75 g is not always g in floating point: compare to a dense run on the same sums.
    torch.testing.assert_close(sparse[:always], dense[:always], rtol=0, atol=1e-6)


def test_bit_identical_given_identical_gradients():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(R, D, generator=g)
    dense, sparse = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    od = torch.optim.Adam([dense], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    osp = SparseRowAdam([sparse], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    always = torch.arange(10)
    for _ in range(20):
        rows = torch.cat([always, torch.randint(10, R, (20,), generator=g)]).unique()
        grad = torch.zeros(R, D)
        grad[rows] = torch.randn(rows.numel(), D, generator=g)
        dense.grad = grad.clone()
        sparse.grad = torch.sparse_coo_tensor(rows[None], grad[rows], (R, D), check_invariants=True)
        od.step()
        osp.step()
    assert torch.equal(sparse[always], dense[always])
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[osp._rows[sparse].rows[:osp.state_rows(sparse)]] = False
    assert torch.equal(sparse[untouched], w0[untouched])  # lazy: never-touched rows never move


def test_state_grows_with_rows_touched_not_table_size():
    big = torch.nn.Parameter(torch.zeros(2_000_000, 16))  # 128 MB table; dense Adam state: 256 MB
    opt = SparseRowAdam([big], lr=1e-3)
    for step in range(3):
        rows = torch.arange(step * 100, step * 100 + 150)
        big.grad = torch.sparse_coo_tensor(rows[None], torch.ones(150, 16), big.shape, check_invariants=True)
        opt.step()
    assert opt.state_rows(big) == 350
    assert opt.state_nbytes() < 1_000_000  # ~KBs, vs 256 MB of dense moments


def test_dense_gradients_work_too():
    p = torch.nn.Parameter(torch.zeros(10, 4))
    opt = SparseRowAdam([p], lr=0.1)
    p.grad = torch.zeros(10, 4)
    p.grad[3] = 1.0
    opt.step()
    assert opt.state_rows(p) == 1 and p[3].ne(0).all() and p[[0, 1, 2]].eq(0).all()


def test_state_dict_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(6):
        rows = torch.randint(0, R, (30,), generator=g)
        grads.append(torch.sparse_coo_tensor(rows[None], torch.randn(30, D, generator=g), (R, D),
                                             check_invariants=True))
    w0 = torch.randn(R, D, generator=g)
    a = torch.nn.Parameter(w0.clone())
    oa = SparseRowAdam([a], lr=1e-2)
    for gr in grads:
        a.grad = gr
        oa.step()
    b = torch.nn.Parameter(w0.clone())
    ob = SparseRowAdam([b], lr=1e-2)
    for gr in grads[:3]:
        b.grad = gr
        ob.step()
    sd = ob.state_dict()
    assert set(sd["state"][0]) == {"rows", "exp_avg", "exp_avg_sq", "steps"}
    ob2 = SparseRowAdam([b], lr=1e-2)
    ob2.load_state_dict(sd)
    for gr in grads[3:]:
        b.grad = gr
        ob2.step()
    assert torch.equal(a, b)
    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg": sd["state"][0]["exp_avg"][:, :3]}}}
    with pytest.raises(ValueError, match="do not fit"):
        SparseRowAdam([b]).load_state_dict(bad)


def test_clip_handles_sparse_and_matches_torch():
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.zeros(50, 4))
    lin = torch.nn.Parameter(torch.zeros(3, 3))
    rows = torch.tensor([1, 7, 7, 30])
    vals = torch.randn(4, 4, generator=g)
    dense_lin = torch.randn(3, 3, generator=g)
    w.grad = torch.sparse_coo_tensor(rows[None], vals, (50, 4), check_invariants=True)
    lin.grad = dense_lin.clone()
    n1 = clip_grad_norm_([w, lin], 0.5)
    ref_w = torch.nn.Parameter(torch.zeros(50, 4))
    ref_lin = torch.nn.Parameter(torch.zeros(3, 3))
    ref_w.grad = torch.sparse_coo_tensor(rows[None], vals, (50, 4), check_invariants=True).to_dense()
    ref_lin.grad = dense_lin.clone()
    n2 = torch.nn.utils.clip_grad_norm_([ref_w, ref_lin], 0.5)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(w.grad.to_dense(), ref_w.grad)
    torch.testing.assert_close(lin.grad, ref_lin.grad)


@pytest.mark.parametrize("max_norm", [0.5, 100.0, float("inf")])
def test_dense_clip_is_torchs_bit_for_bit_and_skips_scaling_by_one(max_norm):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, 8, generator=g), torch.randn(7, generator=g)]
    ours = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    ref = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for a, b, t in zip(ours, ref, grads):
        a.grad, b.grad = t.clone(), t.clone()
    versions = [p.grad._version for p in ours]
    n1 = clip_grad_norm_(ours, max_norm)
    n2 = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert torch.equal(n1, n2)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    scaled = [p.grad._version != v for p, v in zip(ours, versions)]
    assert scaled == [max_norm < float(n2)] * 2  # untouched when the coefficient clamps to 1
    nan = torch.nn.Parameter(torch.zeros(3))
    nan.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert clip_grad_norm_([nan], 1.0).isnan() and nan.grad.isnan().all()  # as torch: NaN spreads


def test_model_sparse_gradients_equal_dense(tiny):
    dense, sparse = tiny.model(), tiny.model()
    use_sparse_table_grads(sparse)
    x = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (dense, sparse):
        m.train()
        m(x, x).loss.backward()
    gd = dense.engram_layers[0].table.weight.grad
    gs = sparse.engram_layers[0].table.weight.grad
    assert gs.is_sparse and not gd.is_sparse
    torch.testing.assert_close(gs.to_dense(), gd)


def test_training_with_sparse_adam_resumes_exactly(tmp_path, tiny):
    data_dir = tiny.dataset(tmp_path / "data", vocab_size=tiny.VOCAB)
    cfg = preset("tiny", tiny.VOCAB)
    tc = dict(steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2, eval_batches=1,
              save_every=2, log_every=1, seed=5, table_optimizer="sparse_adam")
    full = train(cfg, TrainConfig(**tc), data_dir, tmp_path / "full", progress=False)
    train(cfg, TrainConfig(**{**tc, "steps": 2}), data_dir, tmp_path / "part", progress=False)
    resumed = train(cfg, TrainConfig(**tc), data_dir, tmp_path / "part", progress=False, resume=True)
    assert resumed["final_val_loss"] == full["final_val_loss"]
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in l]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    with pytest.raises(ValueError, match="table_optimizer"):
        TrainConfig(table_optimizer="sgd")


def test_build_optimizers_selects_sparse(tiny):
    m = tiny.model()
    opts = build_optimizers(m, TrainConfig(table_optimizer="sparse_adam"))
    assert isinstance(opts["tables"], SparseRowAdam)
    assert m.engram_layers[0].table.sparse
    assert isinstance(build_optimizers(tiny.model(), TrainConfig())["tables"], torch.optim.Adam)
