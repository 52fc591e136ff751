"""qigen: quantized CPU kernels generated for the CPU they run on.

    import qigen
    ks = qigen.load("build/k")            # a directory written by `qigen generate`
    k = ks.find(4096, 4096)
    w = k.quantize(weights)               # round-to-nearest into the kernel's packed layout
    y = k(x, w, threads=2)
"""
from qigen.generate import KernelSet, Request, generate, load
from qigen.quant import QuantizedWeights, dequantize, quantize, reference
from qigen.spec import KernelSpec, Schedule, SpecError

__all__ = ["KernelSet", "KernelSpec", "QuantizedWeights", "Request", "Schedule", "SpecError", "dequantize",
           "generate", "load", "quantize", "reference"]
