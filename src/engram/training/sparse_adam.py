"""Row-sparse (lazy) Adam for Engram tables: optimizer state only for the rows ever touched.

Dense Adam keeps two moments per table entry (2x the table) and updates every row at every
step, even though a batch touches a few thousand rows of millions. :class:`SparseRowAdam`
stores (m, v, step) for a row only once a gradient has touched it, in arrays that grow by
doubling plus a :class:`~engram.tables.rowindex.RowIndex` (row -> state slot), so memory grows with
the rows touched, not with the table. Each step updates only the rows in the gradient.

Semantics, per touched row r at its k-th update (k counted per row)::

    g   = grad_r (+ weight_decay * p_r, L2 as in torch.optim.Adam)
    m_r = lerp(m_r, g, 1 - beta1)          v_r = beta2 v_r + (1 - beta2) g^2
    p_r = p_r - lr / (1 - beta1^k) * m_r / (sqrt(v_r) / sqrt(1 - beta2^k) + eps)

using the same tensor operations in the same order as ``torch.optim.Adam``'s single-tensor
path, so a row that is touched at every step gets bit-for-bit the update dense Adam gives it
(``tests/training/test_sparse_adam.py``). Rows not touched in a step are left alone (dense Adam would
keep moving them with their decaying momentum): that is the "lazy" part, and the reason it is
opt-in (``TrainConfig.table_optimizer = "sparse_adam"``).

Gradients should be sparse (``use_sparse_table_grads`` sets ``EngramTable.sparse``) so that
no table-sized gradient is ever allocated; dense gradients work too (rows with a non-zero
gradient are taken as touched). :func:`clip_grad_norm_` handles a mix of dense and sparse
gradients and gives ``torch.nn.utils.clip_grad_norm_``'s numbers when all are dense.

Shape legend
    R table rows    Dh row width    n rows with state    k rows in this step's gradient
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from engram.errors import EngramError
from engram.model.table import engram_tables
from engram.tables.rowindex import RowIndex
from engram.tables.trainable import TrainableTier


class _RowState:
    """Moments and step counts of the touched rows of one [R, Dh] parameter."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, max_rows: int,
                 capacity: int = 1024) -> None:
        self.dim, self.dtype, self.device, self.max_rows = dim, dtype, device, max_rows
        capacity = max(1, min(capacity, max_rows))
        self.index = RowIndex(capacity, grow=True, limit=max_rows)
        self.rows = torch.empty(capacity, dtype=torch.int64)  # [cap] row held by each slot
        self.exp_avg = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [cap, Dh]
        self.exp_avg_sq = torch.zeros(capacity, dim, dtype=dtype, device=device)  # [cap, Dh]
        self.steps = torch.zeros(capacity, dtype=torch.int64)  # [cap] updates per row
        self.n = 0

    def _grow(self, need: int) -> None:
        cap = self.rows.numel()
        if need <= cap:
            return
        new = min(max(2 * cap, need), max(self.max_rows, need))  # doubling, but never past the table
        for name in ("rows", "steps"):
            old = getattr(self, name)
            t = torch.zeros(new, dtype=old.dtype)
            t[:self.n] = old[:self.n]
            setattr(self, name, t)
        for name in ("exp_avg", "exp_avg_sq"):
            old = getattr(self, name)
            t = torch.zeros(new, self.dim, dtype=old.dtype, device=old.device)
            t[:self.n] = old[:self.n]
            setattr(self, name, t)

    def slots_for(self, rows: torch.Tensor) -> torch.Tensor:
        """State slots of distinct rows [k], creating zero state for new rows."""
        slots, _ = self.index.find(rows)
        new = slots < 0
        k = int(new.sum())
        if k:
            self._grow(self.n + k)
            fresh = torch.arange(self.n, self.n + k)
            new_rows = rows[new]
            self.index.insert(new_rows, fresh)
            self.rows[fresh] = new_rows
            slots[new] = fresh
            self.n += k
        return slots

    @property
    def nbytes(self) -> int:
        per = 2 * self.dim * torch.empty((), dtype=self.dtype).element_size() + 16
        return self.rows.numel() * per + self.index.nbytes

    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [n], exp_avg [n, Dh], exp_avg_sq [n, Dh], steps [n]) of the rows with state, copied."""
        n = self.n
        return self.rows[:n].clone(), self.exp_avg[:n].clone(), self.exp_avg_sq[:n].clone(), self.steps[:n].clone()

    def load(self, rows: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor) -> None:
        n = rows.numel()
        if n:
            self.slots_for(rows)  # slots 0..n-1 in order: rows are distinct
            self.exp_avg[:n] = exp_avg.to(self.dtype)
            self.exp_avg_sq[:n] = exp_avg_sq.to(self.dtype)
            self.steps[:n] = steps.to(torch.int64)


class _FileRowState:
    """The same state for a table in a file-backed tier: moments and step counts in working files
    of the tier (``TrainableTier.row_file``), one row of state per table row (slot = row), so RAM
    holds only the pages a step touches. Same values and operations as :class:`_RowState`."""

    def __init__(self, tier: TrainableTier, dim: int, dtype: torch.dtype) -> None:
        self.dim, self.dtype = dim, dtype
        self.exp_avg = tier.row_file("exp_avg", dim, dtype)  # [R, Dh]
        self.exp_avg_sq = tier.row_file("exp_avg_sq", dim, dtype)  # [R, Dh]
        self.steps = tier.row_file("steps", 1, torch.int64).view(-1)  # [R]; 0: no state yet

    def slots_for(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    @property
    def n(self) -> int:
        return int(self.steps.count_nonzero())

    @property
    def nbytes(self) -> int:
        return 0  # in files; resident pages are the kernel's (and dropped after each step when cached)

    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.nonzero(self.steps).reshape(-1)
        return rows, self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows]

    def load(self, rows: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor) -> None:
        old = torch.nonzero(self.steps).reshape(-1)  # state loaded before: forget it first
        self.exp_avg[old], self.exp_avg_sq[old], self.steps[old] = 0.0, 0.0, 0
        if rows.numel():
            self.exp_avg[rows] = exp_avg.to(self.dtype)
            self.exp_avg_sq[rows] = exp_avg_sq.to(self.dtype)
            self.steps[rows] = steps.to(torch.int64)


class SparseRowAdam(torch.optim.Optimizer):
    """Adam whose state and updates cover only the rows a gradient touched (see the module docstring).

    Params must be 2-D tables. Hyper-parameters as ``torch.optim.Adam`` (no amsgrad, maximize,
    or decoupled decay). ``state_dict()`` holds, per table, ``rows`` [n], ``exp_avg`` /
    ``exp_avg_sq`` [n, Dh] and ``steps`` [n]: the state of the n touched rows only.
    """

    row_sparse_state = True  # checkpoint.py: state tensors are [n, Dh], not the parameter's shape

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 tiers: Optional[dict[torch.Tensor, TrainableTier]] = None) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise EngramError(f"lr={lr}, eps={eps}, weight_decay={weight_decay} must all be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise EngramError(f"betas={betas} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise EngramError(f"SparseRowAdam updates rows of 2-D tables; got a parameter of shape "
                                     f"{tuple(p.shape)}: give it to a dense optimizer instead")
        self._rows: dict[torch.Tensor, Any] = {}
        # Tables in a file-backed tier (engram.tables.trainable): rows are gathered from and
        # scattered back to the tier, and the moments live in its working files.
        self.tiers: dict[torch.Tensor, TrainableTier] = dict(tiers or {})

    def _new_state(self, p: torch.Tensor, capacity: int = 1024) -> Any:
        tier = self.tiers.get(p)
        if tier is not None:
            return _FileRowState(tier, p.shape[1], p.dtype)
        return _RowState(p.shape[1], p.dtype, p.device, p.shape[0], capacity=capacity)

    def _state(self, p: torch.Tensor) -> Any:
        st = self._rows.get(p)
        if st is None:
            st = self._rows[p] = self._new_state(p)
        return st

    @staticmethod
    def _touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct rows [k] sorted, summed gradient rows [k, Dh])."""
        if grad.is_sparse:
            g = grad.coalesce()
            return g.indices()[0], g.values()
        rows = torch.nonzero(grad.ne(0).any(dim=1)).reshape(-1)
        return rows, grad[rows]

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = self._touched(p.grad)
                if rows.numel() == 0:
                    continue
                st = self._state(p)
                slots = st.slots_for(rows.to(torch.int64).cpu())
                slots_d = slots.to(p.device)
                rows_d = rows.to(p.device)
                tier = self.tiers.get(p)
                param = tier.read(rows_d) if tier is not None else p.index_select(0, rows_d)  # [k, Dh]
                if wd != 0:
                    grad = grad.add(param, alpha=wd)
                exp_avg = st.exp_avg.index_select(0, slots_d)
                exp_avg_sq = st.exp_avg_sq.index_select(0, slots_d)
                steps = st.steps[slots] + 1
                st.steps[slots] = steps
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # Bias corrections as Python floats per distinct step count, exactly like Adam's
                # scalars, then one value per row (rows touched every step share one count).
                uniq, inv = torch.unique(steps, return_inverse=True)
                neg_size, bc2_sqrt = [], []
                for s in uniq.tolist():
                    bc1 = 1 - beta1 ** float(s)
                    bc2 = 1 - beta2 ** float(s)
                    neg_size.append(-(lr / bc1))
                    bc2_sqrt.append(bc2 ** 0.5)
                neg_size_t = torch.tensor(neg_size, dtype=p.dtype, device=p.device)[inv.to(p.device)][:, None]
                bc2_t = torch.tensor(bc2_sqrt, dtype=p.dtype, device=p.device)[inv.to(p.device)][:, None]
                denom = (exp_avg_sq.sqrt() / bc2_t).add_(eps)
                # param.addcdiv_(exp_avg, denom, value=-step_size) computes (value * m) / denom + p.
                param = param + (exp_avg * neg_size_t) / denom
                if tier is not None:
                    tier.write(rows_d, param)
                else:
                    p.index_copy_(0, rows_d, param)
                st.exp_avg.index_copy_(0, slots_d, exp_avg)
                st.exp_avg_sq.index_copy_(0, slots_d, exp_avg_sq)
        return loss

    # ------------------------------------------------------------------ introspection
    def state_rows(self, p: torch.Tensor) -> int:
        """How many rows of ``p`` have optimizer state."""
        st = self._rows.get(p)
        return st.n if st is not None else 0

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (capacity included)."""
        return sum(st.nbytes for st in self._rows.values())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            g["params"] = ids
            groups.append(g)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self._rows.get(p)
                if st is None or st.n == 0:
                    continue
                rows, m, v, steps = st.export()
                state[index[id(p)]] = {"rows": rows, "exp_avg": m, "exp_avg_sq": v, "steps": steps}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise EngramError("SparseRowAdam state has a different parameter grouping; it belongs to "
                             "another model or optimizer setup")
        params = {}
        for g, own in zip(groups, self.param_groups):
            for idx, p in zip(g["params"], own["params"]):
                params[int(idx)] = p
            for k, v in g.items():
                if k != "params":
                    own[k] = tuple(v) if k == "betas" else v
        self._rows = {p: st for p, st in self._rows.items() if p in self.tiers}
        for idx, entry in state_dict["state"].items():
            p = params.get(int(idx))
            if p is None:
                raise EngramError(f"SparseRowAdam state for parameter index {idx}, which no group lists")
            rows = entry["rows"].to(torch.int64).cpu()
            n = rows.numel()
            shapes = {k: tuple(entry[k].shape) for k in ("exp_avg", "exp_avg_sq")}
            if any(s != (n, p.shape[1]) for s in shapes.values()) or tuple(entry["steps"].shape) != (n,):
                raise EngramError(f"SparseRowAdam state {idx}: shapes {shapes} and steps "
                                 f"{tuple(entry['steps'].shape)} do not fit {n} rows of width {p.shape[1]}")
            if n and (int(rows.min()) < 0 or int(rows.max()) >= p.shape[0]):
                raise EngramError(f"SparseRowAdam state {idx}: row ids outside the table's {p.shape[0]} rows")
            st = self._rows.get(p) if p in self.tiers else None  # a tier's files are made once
            st = st or self._new_state(p, capacity=max(1024, n))
            st.load(rows, entry["exp_avg"], entry["exp_avg_sq"], entry["steps"])
            self._rows[p] = st


def use_sparse_table_grads(model: Any, sparse: bool = True) -> None:
    """Make the Engram tables of ``model`` produce sparse (row) gradients."""
    for table in engram_tables(model).values():
        table.sparse = sparse


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) that also accepts sparse gradients.

    With only dense gradients it is torch's function in its two halves, with the same numbers,
    minus the scaling pass when the coefficient clamps to 1: torch multiplies every gradient by
    1.0 anyway to spare GPUs a synchronisation, a pass over the whole Engram table's gradient
    on most steps. Sparse gradients are coalesced in place first (duplicate rows summed), so the
    norm is that of the dense gradient.
    """
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if not float(max_norm / (total + 1e-6)) >= 1.0:  # torch's coefficient; NaN scales too, as in torch
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(p.grad._values() if p.grad.is_sparse else p.grad, 2.0)
             for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    scale_grads_(params, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def scale_grads_(params: Iterable[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient, dense or sparse (coalesced), by ``coef`` in place."""
    for p in params:
        if p.grad.is_sparse:
            p.grad = torch.sparse_coo_tensor(p.grad._indices(), p.grad._values() * coef,
                                             p.grad.shape, is_coalesced=True, check_invariants=False)
        else:
            p.grad.mul_(coef)
