"""GPTQ (Frantar et al., 2022): quantize a layer column by column into quant.quantize()'s format,
feeding each column's rounding error into the columns not yet quantized through the inverse
Hessian of the layer's inputs, so that the layer's outputs X·Ŵᵀ stay close to X·Wᵀ.

    acc = HessianAccumulator()
    layer.register_forward_hook(lambda module, args, out: acc.add(args[0]))
    ... run calibration batches through the model ...
    q = gptq(layer.weight.detach().numpy(), acc.value(), spec)   # q.codes, q.scales, q.offsets
"""
from __future__ import annotations


import numpy as np
import torch

from qigen.quant import QuantizedWeights, quantize
from qigen.spec import KernelSpec


class HessianAccumulator:
    """H = 2/n · XᵀX over every input row seen so far; add() takes (..., cols) batches as they pass."""

    def __init__(self) -> None:
        self.n = 0
        self._xtx: torch.Tensor | None = None  # (cols, cols) float64: Σ xᵀx

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        if x.ndim < 2:
            raise ValueError(f"inputs have shape {tuple(x.shape)}: expected (samples, cols) or (..., cols)")
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise ValueError("calibration inputs contain NaN or infinity")
        if self._xtx is None:
            self._xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        if x.shape[1] != self._xtx.shape[0]:
            raise ValueError(f"inputs have {x.shape[1]} columns, earlier batches had {self._xtx.shape[0]}")
        self._xtx += x.T @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were added: the Hessian is undefined")
        return self._xtx * (2.0 / self.n)


def hessian(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """H = 2/n · XᵀX (float64) for calibration inputs x of shape (samples, cols)."""
    acc = HessianAccumulator()
    acc.add(x)
    return acc.value()


def gptq(w: np.ndarray, h: np.ndarray | torch.Tensor, spec: KernelSpec, damp: float = 0.01,
         block: int = 128, act_order: bool = False) -> QuantizedWeights:
    """Quantize w (rows, cols) for inputs whose Hessian is h (cols, cols); dequantize() reads the result.

    Without act_order a group's scale and offset come from its columns' error-updated weights when
    its first column is reached. With act_order columns go in order of decreasing diag(H), and the
    groups stay runs of consecutive original columns ("static groups"): their parameters are RTN's,
    found from the original weights before any update.

    The column loop is many small torch ops: on a few (shared) cores torch.set_num_threads(1) is fastest.
    """
    _check(w, h, spec, damp, block)
    cols, gs = spec.cols, spec.group_size
    W = torch.tensor(np.asarray(w), dtype=torch.float64)  # a copy: updated in place
    H = torch.as_tensor(h).to("cpu", torch.float64, copy=True)
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    importance = torch.diag(H).clamp(min=0).numpy().astype(np.float32)  # Σx² per input: the group search weighs it
    rtn = quantize(W.numpy().astype(np.float32), spec, importance)  # act_order's static groups; else each group redone
    scales = torch.from_numpy(rtn.scales.astype(np.float32))  # (rows, groups), values exact in storage dtype
    offsets = None if spec.symmetric else torch.from_numpy(rtn.offsets.astype(np.float32))
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, order], H[order][:, order]  # from here on, column j is original column order[j]
    U = _inverse_factor(H, damp)  # upper Cholesky factor of (H + λI)⁻¹
    codes = torch.zeros(spec.rows, cols, dtype=torch.uint8)

    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        Wb = W[:, b0:b1].clone()  # this block, kept up to date column by column
        Eb = torch.zeros_like(Wb)  # scaled errors of the block's columns, applied to W[:, b1:] at its end
        Ub = U[b0:b1, b0:b1]
        for i, c in enumerate(order[b0:b1].tolist()):  # c: the original column
            g = c // gs
            if not act_order and c % gs == 0:  # a group starts: its parameters from its current weights
                end = min(c + gs, cols)
                pending = Eb[:, :i] @ U[b0:b0 + i, b1:end]  # this block's updates not yet in W[:, b1:end]
                current = torch.cat([Wb[:, i:end - b0], W[:, b1:end] - pending], dim=1)
                scales[:, g], off = _group_params(current, spec, importance[c:end])
                if offsets is not None:
                    offsets[:, g] = off
            codes[:, c], q = _round(Wb[:, i], scales[:, g], None if offsets is None else offsets[:, g], spec)
            err = (Wb[:, i] - q) / Ub[i, i]
            Wb[:, i + 1:].addr_(err, Ub[i, i + 1:], alpha=-1)  # -= err ⊗ U[i, later columns of the block]
            Eb[:, i] = err
        W[:, b1:] -= Eb @ U[b0:b1, b1:]  # the lazy batch update of every later column

    store = rtn.scales.dtype  # the spec's scale dtype
    return QuantizedWeights(codes.numpy(), scales.numpy().astype(store),
                            None if offsets is None else offsets.numpy().astype(store))


def _check(w: np.ndarray, h: np.ndarray | torch.Tensor, spec: KernelSpec, damp: float, block: int) -> None:
    if np.shape(w) != (spec.rows, spec.cols):
        raise ValueError(f"weights have shape {np.shape(w)}, the spec is {spec.rows}x{spec.cols}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinity")
    if tuple(np.shape(h)) != (spec.cols, spec.cols):
        raise ValueError(f"Hessian has shape {tuple(np.shape(h))}: expected ({spec.cols}, {spec.cols}), "
                         "one row and column per input")
    if not torch.isfinite(torch.as_tensor(h)).all():
        raise ValueError("Hessian contains NaN or infinity")
    if not (np.isfinite(damp) and damp > 0):
        raise ValueError(f"damp={damp} must be a positive fraction of the mean Hessian diagonal (typically 0.01)")
    if block < 1:
        raise ValueError(f"block={block} must be at least 1 column")


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H)."""
    H = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        return torch.linalg.cholesky(inv, upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError(f"the Hessian is not positive definite even after dampening by {damp} of its mean "
                         "diagonal: check that it is XᵀX of the layer's inputs, or raise damp") from None


def _group_params(w: torch.Tensor, spec: KernelSpec, importance: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One group's (scale, offset) per row for weights w (rows, n), by quantize()'s own search."""
    whole = KernelSpec(w.shape[0], w.shape[1], spec.bits, None, spec.symmetric, spec.scale_dtype)  # any family's rule
    q = quantize(w.numpy().astype(np.float32), whole, importance)
    return (torch.from_numpy(q.scales[:, 0].astype(np.float32)),
            None if q.offsets is None else torch.from_numpy(q.offsets[:, 0].astype(np.float32)))


def _round(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
           spec: KernelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of one column and what dequantize() makes of them, in quantize()'s float32 arithmetic."""
    top, mid = (1 << spec.bits) - 1, spec.zero_point
    x = w.to(torch.float32)
    if offset is None:
        code = torch.clamp(torch.round(x / scale) + mid, 0, top)
        return code.to(torch.uint8), (scale * (code - mid)).to(torch.float64)
    code = torch.clamp(torch.round((x - offset) / scale), 0, top)
    return code.to(torch.uint8), (scale * code + offset).to(torch.float64)
