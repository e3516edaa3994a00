"""Feed-forward layers: SwiGLU (dense) and DeepSeekMoE (shared + fine-grained routed experts).

Shape legend
    N tokens (B*T flattened)   D hidden   I expert width   E routed experts   K experts per token

Routing follows DeepSeek-V3: affinity s = sigmoid(x W_r); the top-K experts are chosen by
s + b, where the per-expert bias b is *not* trained by gradients but nudged after each step
towards balanced load (auxiliary-loss-free balancing): b_i += gamma * sign(mean_load - load_i).
The gate weights use s alone (normalised over the K chosen), so the bias steers only selection.

With a ``historian`` (``engram.model.historian``) the last routed slot, expert E-1, is an Engram
memory instead of a SwiGLU: it is scored, chosen, weighted and balanced like the others, but
reads the token's hash ids ([N,H], H hash heads) instead of its hidden state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.errors import EngramError


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepSeekMoE(nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: int, bias_update_speed: float,
                 routed_scaling_factor: float = 1.0, historian: Optional[nn.Module] = None):
        super().__init__()
        self.n_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.bias_update_speed = bias_update_speed
        self.routed_scaling_factor = routed_scaling_factor
        self.router = nn.Linear(hidden_size, n_routed_experts, bias=False)
        n_ffn = n_routed_experts - (historian is not None)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, moe_intermediate_size) for _ in range(n_ffn))
        # The memory expert's slot (the last), or None: every expert is a SwiGLU.
        self.historian_index: Optional[int] = None
        if historian is not None:
            self.experts.append(historian)
            self.historian_index = n_ffn
        # Shared experts always run; fusing them into one wider SwiGLU is equivalent.
        self.shared = (
            SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts) if n_shared_experts > 0 else None
        )
        # Balancing state: persistent so that resume is exact.
        self.register_buffer("expert_bias", torch.zeros(n_routed_experts))
        self.register_buffer("load_accum", torch.zeros(n_routed_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,D] -> (expert ids [N,K], weights [N,K])."""
        scores = torch.sigmoid(self.router(x).float())  # [N,E]
        _, idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
        w = scores.gather(-1, idx)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-9) * self.routed_scaling_factor
        return idx, w.to(x.dtype)

    @property
    def historian(self) -> Optional[nn.Module]:
        return None if self.historian_index is None else self.experts[self.historian_index]

    def forward(self, x: torch.Tensor, hash_ids: Optional[torch.Tensor] = None, *,
                overlay: Optional[object] = None, zero_historian: bool = False) -> torch.Tensor:
        """x [...,D] -> [...,D]. With a historian: ``hash_ids`` [...,H] of the same tokens (the
        layer's Engram hash ids), ``overlay`` its table rows read from a ``RowOverlay``, and
        ``zero_historian`` makes it output zeros (routing unchanged: the Engram ablation)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        flat_hash = None
        if self.historian_index is not None:
            if hash_ids is None:
                raise EngramError("this DeepSeekMoE has a historian expert: pass its layer's hash ids (hash_ids=)")
            flat_hash = hash_ids.reshape(x.shape[0], -1)  # [N,H]
        idx, w = self.route(x)
        if self.training:
            with torch.no_grad():
                self.load_accum += torch.bincount(idx.flatten(), minlength=self.n_experts).float()
        out = torch.zeros_like(x)
        flat_idx = idx.flatten()  # [N*K]
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_experts).tolist()
        start = 0
        for e, c in enumerate(counts):  # each expert runs once on the tokens routed to it
            if c == 0:
                continue
            sel = order[start:start + c]
            start += c
            tok = token_of[sel]
            if e == self.historian_index:
                y = self.experts[e](flat_hash[tok], overlay)
                if zero_historian:
                    y = torch.zeros_like(y)
                y = y.to(x.dtype) * w.flatten()[sel].unsqueeze(-1)
            else:
                y = self.experts[e](x[tok]) * w.flatten()[sel].unsqueeze(-1)
            out.index_add_(0, tok, y)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Apply one balancing step from the load counted since the last call; returns that load."""
        load = self.load_accum.clone()
        if load.sum() > 0:
            self.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.load_accum.zero_()
        return load
