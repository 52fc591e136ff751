"""PyTorch integration: nn.Linear layers quantized and multiplied by generated kernels.

Two verbs, as in gpt-fast's quantize.py: `QuantLinear.from_linear` converts one layer,
`swap_linears` converts a model in place and builds all the kernels it needs in one library.

The matrix product is the custom op `qigen::quant_linear(x, handle, threads)`, so torch.compile
and tracing see one opaque call instead of a graph break.  An op cannot take Python objects, so
each QuantLinear registers its bound kernels under an integer handle and passes the handle.
Inference only: the codes are frozen and no gradient flows through the layer.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
import numpy as np
import torch
from torch import nn

from perfmodel.host import detect
from qigen.pipeline import best_isa, build
from qigen.quant import QuantizedWeights, quantize
from qigen.spec import DEFAULT_GROUP, KernelSpec, prefill_spec
from runtime import bandwidth
from runtime.loader import Kernel
from runtime.model import PREFILL_BATCH

Bound = Callable[..., np.ndarray]  # f(x, threads=None) from Kernel.bind
_BOUND: dict[int, tuple[Bound, Bound, int]] = {}  # handle → (decode, prefill, out_features)
_handles = itertools.count(1)


class _Binding:
    """Owns one registry entry; deep copies of a module share it, and it goes with the last of them."""

    def __init__(self, decode: Bound, prefill: Bound, rows: int):
        self.handle = next(_handles)
        _BOUND[self.handle] = (decode, prefill, rows)
        weakref.finalize(self, _BOUND.pop, self.handle, None)

    def __deepcopy__(self, memo: dict) -> _Binding:
        return self

    def __reduce__(self):
        raise TypeError("a QuantLinear holds compiled kernels and cannot be pickled: "
                        "save the float model (or its state_dict) and call swap_linears after loading")


def _entry(handle: int) -> tuple[Bound, Bound, int]:
    try:
        return _BOUND[handle]
    except KeyError:
        raise ValueError(f"qigen::quant_linear: handle {handle} belongs to no live QuantLinear") from None


@torch.library.custom_op("qigen::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, handle: int, threads: int) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) for float32 CPU x of (..., in_features) with the kernels registered under
    `handle`; threads 0 uses the count the kernels' schedules were chosen for."""
    decode, prefill, rows = _entry(handle)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"qigen::quant_linear takes float32 CPU tensors, not {x.dtype} on {x.device}")
    lead = x.shape[:-1]
    flat = x.detach().reshape(-1, x.shape[-1]).contiguous()  # (n, in_features); no copy when already so
    if flat.shape[0] == 0:
        return x.new_empty((*lead, rows))
    a = flat.numpy()
    y = decode(a[0], threads or None) if a.shape[0] == 1 else prefill(a, threads or None)  # (rows,) or (n, rows)
    return torch.from_numpy(y).reshape(*lead, rows)


@quant_linear.register_fake
def _(x: torch.Tensor, handle: int, threads: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _entry(handle)[2]))


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized and multiplied by a generated kernel.

    forward takes floating-point CPU x of (..., in_features) and returns (..., out_features) in x's
    dtype, computed in float32: the matrix-vector (decode) kernel when the leading dimensions hold
    one row, the matrix-matrix (prefill) kernel otherwise.  Inference only: x is detached, so the
    output never requires grad and no gradient reaches earlier layers.
    """

    def __init__(self, spec: KernelSpec, q: QuantizedWeights, bias: torch.Tensor | None,
                 kernels: dict[KernelSpec, Kernel], threads: int | None = None):
        super().__init__()
        missing = [s.name for s in (spec, prefill_spec(spec, PREFILL_BATCH)) if s not in kernels]
        if missing:
            raise ValueError(f"no kernel for {', '.join(missing)}: build them with qigen.torch_ops.build_kernels")
        gemv, gemm = kernels[spec], kernels[prefill_spec(spec, PREFILL_BATCH)]
        b = None if bias is None else bias.detach().float().cpu().numpy()
        self.spec, self.quantized, self.threads = spec, q, threads
        self.in_features, self.out_features = spec.cols, spec.rows
        self.bias = None if bias is None else bias.detach().float().cpu().clone()  # a copy: the kernels hold theirs
        self._binding = _Binding(gemv.bind(gemv.pack(q), b), gemm.bind(gemm.pack(q), b), spec.rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group: int | None = DEFAULT_GROUP, symmetric: bool = False,
                    scale_dtype: str = "fp16", threads: int | None = None,
                    kernels: dict[KernelSpec, Kernel] | None = None) -> QuantLinear:
        """Round-to-nearest quantize `linear`; `kernels` (from build_kernels) must hold its spec at batch 1
        and PREFILL_BATCH, else a library is built for this layer alone."""
        spec = spec_for(linear, bits, group, symmetric, scale_dtype)
        if kernels is None:
            kernels = build_kernels({spec}, threads)
        q = quantize(linear.weight.detach().float().cpu().numpy(), spec)
        return cls(spec, q, linear.bias, kernels, threads)

    @property
    def handle(self) -> int:
        return self._binding.handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"QuantLinear runs on the CPU; x is on {x.device}: move it with x.cpu()")
        if not x.is_floating_point():
            raise ValueError(f"x has dtype {x.dtype}: QuantLinear takes floating-point inputs")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (..., {self.in_features}) "
                             f"for a {self.in_features}→{self.out_features} QuantLinear")
        y = quant_linear(x.detach().float(), self.handle, self.threads or 0)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.spec.name}"


def build_kernels(specs: set[KernelSpec], threads: int | None = None) -> dict[KernelSpec, Kernel]:
    """The matrix-vector kernel of every spec and its matrix-matrix twin (PREFILL_BATCH), the best predicted
    schedules, in one library (compiled once, then cached)."""
    twins = [prefill_spec(s, PREFILL_BATCH) for s in specs]
    return build([*specs, *twins], bandwidth.measured(detect()), threads).kernels


def spec_for(linear: nn.Linear, bits: int = 4, group: int | None = DEFAULT_GROUP, symmetric: bool = False,
             scale_dtype: str = "fp16") -> KernelSpec:
    """The matrix-vector spec of `linear` on this CPU's best ISA; SpecError names a broken rule."""
    return KernelSpec(linear.out_features, linear.in_features, bits, group, symmetric, scale_dtype,
                      isa=best_isa(detect()))


def swap_linears(model: nn.Module, bits: int = 4, group: int | None = DEFAULT_GROUP,
                 skip: Callable[[str, nn.Linear], bool] | None = None, threads: int | None = None,
                 symmetric: bool = False, scale_dtype: str = "fp16") -> nn.Module:
    """Replace, in place, every nn.Linear of `model` that skip(qualified name, linear) does not keep
    (e.g. lambda name, _: name == "lm_head") by a QuantLinear; all kernels come from one library.
    Linears inside nn.MultiheadAttention stay: it reads their weights directly.  A Linear shared by
    several parents is quantized once.  Returns the model (a QuantLinear when model is a Linear)."""
    if isinstance(model, nn.Linear):
        if skip is not None and skip("", model):
            return model
        return QuantLinear.from_linear(model, bits, group, symmetric, scale_dtype, threads)
    places = []  # (parent, attribute, linear)
    for prefix, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for name, child in parent._modules.items():  # named_children() would hide a repeated child
            if isinstance(child, nn.Linear) and not (skip is not None and skip(f"{prefix}.{name}" if prefix else name, child)):
                places.append((parent, name, child))
    if not places:
        return model
    specs = {spec_for(lin, bits, group, symmetric, scale_dtype) for _, _, lin in places}  # SpecError before compiling
    kernels = build_kernels(specs, threads)
    swapped: dict[int, QuantLinear] = {}
    for parent, name, lin in places:
        if id(lin) not in swapped:
            swapped[id(lin)] = QuantLinear.from_linear(lin, bits, group, symmetric, scale_dtype, threads, kernels)
        setattr(parent, name, swapped[id(lin)])
    return model
