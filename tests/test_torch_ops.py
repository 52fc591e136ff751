"""QuantLinear and swap_linears: generated kernels behind a torch custom op, against the numpy oracle."""
import copy
import gc

import numpy as np
import pytest
import torch
from torch import nn

import qigen.pipeline
from qigen import torch_ops
from qigen.quant import dequantize, quantize, reference
from qigen.spec import SpecError
from qigen.torch_ops import QuantLinear, build_kernels, spec_for, swap_linears

THREADS = 2
FORMATS = {"q4_g32_asym": dict(bits=4, group=32), "q3_g64_sym": dict(bits=3, group=64, symmetric=True),
           "q8_g32_asym": dict(bits=8, group=32)}


def linear(cols: int, rows: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows, bias=bias)


@pytest.fixture(scope="module")
def kernels():
    """Every format of a ragged 100→37 layer (37 rows fill no tile, 100 inputs no group) in one library."""
    return build_kernels({spec_for(linear(100, 37), **f) for f in FORMATS.values()}, THREADS)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fmt", ["q4_g32_asym", "q3_g64_sym"])
def test_matches_reference(kernels, fmt, bias):
    lin = linear(100, 37, bias)
    ql = QuantLinear.from_linear(lin, **FORMATS[fmt], threads=THREADS, kernels=kernels)
    spec = ql.spec
    q = quantize(lin.weight.detach().numpy(), spec)
    b = None if lin.bias is None else lin.bias.detach().numpy()
    magnitude = np.abs(dequantize(q, spec)).T  # fp32 rounding scales with the sum of |terms|
    rng = np.random.default_rng(1)
    for shape in [(100,), (1, 100), (5, 100), (2, 3, 100)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = ql(torch.from_numpy(x))
        assert got.shape == (*shape[:-1], 37) and got.dtype == torch.float32
        flat = x.reshape(-1, 100)
        want = reference(flat, q, spec, b).reshape(*shape[:-1], 37)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, err_msg=f"x of {shape}",
                                   atol=2e-6 * (np.abs(flat) @ magnitude).max() + 1e-6)


def test_8bit_close_to_float(kernels):
    lin = linear(100, 37)
    ql = QuantLinear.from_linear(lin, **FORMATS["q8_g32_asym"], threads=THREADS, kernels=kernels)
    x = torch.randn(6, 100)
    want = lin(x).detach()
    assert ((ql(x) - want).norm() / want.norm()).item() < 1e-2


def test_input_conversions(kernels):
    lin = linear(100, 37)
    ql = QuantLinear.from_linear(lin, **FORMATS["q4_g32_asym"], threads=THREADS, kernels=kernels)
    x = torch.randn(100, 4).T  # not contiguous
    np.testing.assert_allclose(ql(x).numpy(), ql(x.contiguous()).numpy(), rtol=0, atol=0)
    assert ql(x.double()).dtype == torch.float64  # computed in float32, returned in x's dtype
    assert ql(torch.randn(0, 100)).shape == (0, 37)
    grad = torch.randn(3, 100, requires_grad=True)
    assert not ql(grad).requires_grad  # inference only: x is detached


def test_errors(kernels):
    lin = linear(100, 37)
    with pytest.raises(SpecError, match="bits=5"):
        QuantLinear.from_linear(lin, bits=5, kernels=kernels)
    with pytest.raises(SpecError, match="group size 48"):
        QuantLinear.from_linear(lin, bits=4, group=48, kernels=kernels)
    ql = QuantLinear.from_linear(lin, **FORMATS["q4_g32_asym"], threads=THREADS, kernels=kernels)
    with pytest.raises(ValueError, match=r"x has shape \(2, 99\): expected \(\.\.\., 100\)"):
        ql(torch.randn(2, 99))
    with pytest.raises(ValueError, match="CPU"):
        ql(torch.empty(2, 100, device="meta"))
    with pytest.raises(ValueError, match="no kernel for gemv_q4_g128"):
        QuantLinear.from_linear(lin, bits=4, group=128, kernels=kernels)


def test_registry_follows_module_lifetime(kernels):
    ql = QuantLinear.from_linear(linear(100, 37), **FORMATS["q4_g32_asym"], threads=THREADS, kernels=kernels)
    handle, twin = ql.handle, copy.deepcopy(ql)
    assert twin.handle == handle
    del ql
    gc.collect()
    assert handle in torch_ops._BOUND  # the deep copy still runs on it
    del twin
    gc.collect()
    assert handle not in torch_ops._BOUND


class Block(nn.Module):
    """A tiny transformer-like block: a two-layer MLP with a residual, then an output head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, x):
        x = x + self.mlp(self.norm(x))
        return self.lm_head(x)


@pytest.fixture
def compiles(monkeypatch):
    """The libraries build_kernels compiles during a test."""
    calls = []

    def counted(source, target, *args, **kwargs):
        calls.append(source)
        return compile_(source, target, *args, **kwargs)

    compile_ = qigen.pipeline.compile  # build_kernels compiles through qigen.pipeline
    monkeypatch.setattr(qigen.pipeline, "compile", counted)
    return calls


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("skip", [None, lambda name, _: name == "lm_head"], ids=["all", "skip-head"])
def test_swap_linears(compiles, skip):
    model = Block()
    x = torch.randn(2, 5, 64)
    want = model(x).detach()
    assert swap_linears(model, bits=8, group=32, skip=skip, threads=THREADS) is model
    assert len(compiles) == 1  # every shape, matrix-vector and matrix-matrix, in one library
    assert isinstance(model.mlp[0], QuantLinear) and isinstance(model.mlp[2], QuantLinear)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.mlp[1], nn.GELU)
    assert type(model.lm_head) is (nn.Linear if skip else QuantLinear)
    assert relative(model(x), want) < 1e-2
    assert relative(model(x[0, :1]), want[0, :1]) < 1e-2  # one row: the matrix-vector kernels


def test_swap_linears_shared_and_attention(compiles):
    shared = linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    swap_linears(model, bits=4, group=64, threads=THREADS)
    assert model[0] is model[2] and isinstance(model[0], QuantLinear)
    attn = nn.MultiheadAttention(64, 4, batch_first=True)
    swap_linears(attn, threads=THREADS)
    assert type(attn.out_proj) is not QuantLinear  # MultiheadAttention reads out_proj.weight itself
    assert len(compiles) == 1


def test_custom_op_traces(kernels):
    ql = QuantLinear.from_linear(linear(100, 37), **FORMATS["q4_g32_asym"], threads=THREADS, kernels=kernels)
    op = torch.ops.qigen.quant_linear.default
    torch.library.opcheck(op, (torch.randn(3, 100), ql.handle, THREADS))
    model = nn.Sequential(ql, nn.ReLU())
    x = torch.randn(2, 3, 100)
    # fullgraph: a graph break is an error; aot_eager runs the fake implementation through AOTAutograd.
    # The inductor backend works too but needs ~25 s of C++ compilation on two cores.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
