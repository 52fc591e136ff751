"""qigen: quantized CPU kernels generated for the CPU they run on.

    import qigen
    model = qigen.load()                  # SmolLM2-135M-Instruct, 4-bit, kernels for this CPU
    print("".join(model.generate("Write a haiku about caches")))

    ks = qigen.load("build/k")            # a kernel set written by `qigen generate`
    k = ks.find(4096, 4096)
    w = k.quantize(weights)               # round-to-nearest into the kernel's packed layout
    y = k(x, w, threads=2)
"""
from importlib import import_module

from qigen import families  # noqa: F401  registers every kernel family before any spec is made

# Lazy: the stages load on first use (perfmodel, the compiler, torch for GPTQ).
_EXPORTS = {"KernelSet": "pipeline", "Request": "pipeline", "generate": "pipeline", "load": "llm", "load_model": "llm", "quantize_model": "llm",
            "QuantizedWeights": "quant", "dequantize": "quant", "quantize": "quant", "reference": "quant",
            "KernelSpec": "spec", "Schedule": "spec", "SpecError": "spec"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qigen' has no attribute '{name}'")
    return getattr(import_module(f"qigen.{_EXPORTS[name]}"), name)
