"""Two element-wise pieces of the Engram layer with hand-written backward passes.

On CPU, autograd runs ``F.rms_norm``'s backward as the derivatives of its decomposition (pow,
mean, rsqrt, mul: about a dozen passes over the activations), and a depthwise ``nn.Conv1d``'s
backward through oneDNN is slow for this shape; together they were most of the Engram layer's
extra time in a training step. Both functions compute the same numbers as before up to
floating-point reordering (tests/model/test_ops.py):

    rms_norm            forward bit for bit F.rms_norm's training forward; gradients reordered
    causal_conv_silu    SiLU(causal depthwise conv), as K shifted multiply-adds instead of Conv1d

Shape legend
    B batch   T positions   C channels   K kernel taps   d dilation   R = (K - 1) * d history rows
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_FLOATS = (torch.float32, torch.float64)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # The ops of torch's composite rms_norm (what autograd runs on CPU), in its order.
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [..., 1]
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        xhat, rstd, weight = ctx.saved_tensors
        gw = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gxhat = grad * weight
            dot = (gxhat * xhat).mean(-1, keepdim=True)  # d/dx of x * rstd(x), projected
            gx = gxhat.addcmul_(xhat, dot, value=-1).mul_(rstd)
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """``F.rms_norm(x, (x.shape[-1],), weight, eps)`` (``eps`` None: the dtype's machine epsilon).

    When a gradient is needed (float32/64) the forward is the same ops as torch's composite
    rms_norm, so the same numbers, and the backward is five passes instead of the decomposition's
    derivatives; otherwise it is ``F.rms_norm`` itself.
    """
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.dtype in _FLOATS and weight.dtype == x.dtype):
        return _RMSNorm.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """Conv1d depthwise weight [C,1,K] -> taps [K,C], contiguous rows for broadcasting over x."""
    return weight.squeeze(1).t().contiguous()


def _causal_conv(x: torch.Tensor, taps: torch.Tensor, dilation: int,
                 history: Optional[torch.Tensor]) -> torch.Tensor:
    """z[:, t] = sum_k taps[k] * xx[:, t - (K-1-k)*d], xx = history (zeros if None) then x.

    Summed from the newest tap (k = K-1, shift 0) back to k = 0 (shift R). Terms that read the
    zero history are skipped, which changes no sum, so a sequence gives the same numbers in one
    call as in chunks that pass their history on.
    """
    K, T = taps.shape[0], x.shape[1]
    xx = x if history is None else torch.cat([history, x], dim=1)
    H = xx.shape[1] - T  # rows of history before x
    z = x * taps[K - 1]
    for k in range(K - 2, -1, -1):
        s = (K - 1 - k) * dilation
        if s <= H:
            z.addcmul_(xx[:, H - s:H - s + T], taps[k])
        elif s - H < T:  # the first s - H outputs read rows before the history: zeros
            z[:, s - H:].addcmul_(xx[:, :T - (s - H)], taps[k])
    return z


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        taps = _taps(weight)
        z = _causal_conv(x, taps, dilation, None)
        ctx.save_for_backward(x, taps, z)
        ctx.dilation = dilation
        return F.silu(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, taps, z = ctx.saved_tensors
        K, T, d = taps.shape[0], x.shape[1], ctx.dilation
        gz = torch.ops.aten.silu_backward(grad, z)
        gx = gz * taps[K - 1] if ctx.needs_input_grad[0] else None
        gw = taps.new_zeros(taps.shape) if ctx.needs_input_grad[1] else None  # [K,C]
        if gw is not None:
            gw[K - 1] = (gz * x).sum((0, 1))
        for k in range(K - 2, -1, -1):
            s = (K - 1 - k) * d
            if s >= T:
                continue
            if gx is not None:
                gx[:, :T - s].addcmul_(gz[:, s:], taps[k])
            if gw is not None:
                gw[k] = (gz[:, s:] * x[:, :T - s]).sum((0, 1))
        return gx, None if gw is None else gw.t().unsqueeze(1), None


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, dilation: int,
                     history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiLU of the causal depthwise conv of x [B,T,C] (channels last) with a Conv1d weight
    [C,1,K]: ``silu(conv1d(cat(history, x).transpose(1, 2), weight, dilation=d, groups=C))``
    transposed back, [B,T,C]. ``history``: the R rows before x ([B,R,C]); None means zeros."""
    if (history is None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.dtype in _FLOATS and weight.dtype == x.dtype):
        return _CausalConvSiLU.apply(x, weight, dilation)
    return F.silu(_causal_conv(x, _taps(weight), dilation, history))
