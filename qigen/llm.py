"""Models end to end: quantize a checkpoint offline into one .qigen file, load any model for inference.

A .qigen file is safetensors: per linear layer the arrays of its QuantizedWeights (codes in a row-major packing as
`words`, re-tiled for the host's kernels at load time; scales; offsets), stacked rows in file order (gate_up's
gate then up); norms in fp32. Its
metadata holds the format version, the model config, the quantization spec and method, the tokenizer
and the source model's sha256, so `load` needs nothing else.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from perfmodel.host import detect
from qigen.arch import HEAD, ROLES, CheckpointError, LlamaConfig
from qigen.kvcache import DEFAULT as DEFAULT_KV_CACHE
from qigen.layout import pack_codes, stored_layout, unpack_codes
from qigen.pipeline import best_isa, build
from qigen.quant import QuantizedWeights, check_outliers, quantize
from qigen.spec import KernelSpec, QuantSpec, SpecError, StepSpec, prefill_spec
from runtime import bandwidth
from runtime.checkpoint import Checkpoint, Safetensors, default_model, write_safetensors
from runtime.checkpoint import load as load_checkpoint
from runtime.compiler import cache_dir
from runtime.model import (PREFILL_BATCH, Kernels, Layer, Model, Weights, quantize_rows, kv_cache_format,
                           quantize_weights, split_linears, take_rows)
from runtime.tokenizer import Tokenizer, TokenizerError

FORMAT, VERSION = "qigen-model", 1
DEFAULT_QUANT = QuantSpec()


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _stored(name: str, q: QuantizedWeights, spec: KernelSpec) -> dict[str, np.ndarray]:
    """The file's tensors of a matrix: each array of its QuantizedWeights, the codes packed row-major as words."""
    arrays = q.arrays()
    words = pack_codes(arrays.pop("codes"), stored_layout(spec.bits, spec.rows, spec.cols)).reshape(-1)
    return {f"{name}.words": words} | {f"{name}.{k}": a for k, a in arrays.items()}


def _header(f: Safetensors, name: str, dtype, shape: tuple[int, ...]) -> str:
    """`name`, refused unless the file holds it with exactly the dtype and shape the spec says."""
    if name not in f.tensors:
        raise CheckpointError(f"tensor '{name}' is missing")
    if f.dtype(name) != dtype or f.tensors[name][1] != shape:
        raise CheckpointError(f"tensor '{name}' is {f.dtype(name)} {f.tensors[name][1]}, the spec needs "
                              f"{np.dtype(dtype)} {shape}")
    return name


def _tensor(f: Safetensors, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return f.read(_header(f, name, dtype, shape))


@dataclass(frozen=True, eq=False)
class StoredWeights:
    """A matrix still in its .qigen file, its tensors checked against the spec: read and unpacked when loaded. A
    model packs its matrices one at a time, so that only one is unpacked at once (unpacking every matrix on reading
    the file took 134 MB of uint8 codes for the default model, beside the 100 MB file read whole)."""
    file: Safetensors
    name: str
    spec: KernelSpec
    order: np.ndarray | None  # the file's rows, taken in this order (None: as stored)
    outliers: np.ndarray | None  # read and checked with the header: small, and data rather than format
    outlier_weights: np.ndarray | None  # rows in `order`

    @classmethod
    def open(cls, f: Safetensors, name: str, spec: KernelSpec, order: np.ndarray | None = None) -> StoredWeights:
        """The matrix `name` of f, refused unless it is one in spec's format."""
        groups = (spec.rows, spec.groups)
        _header(f, f"{name}.words", np.uint32, (stored_layout(spec.bits, spec.rows, spec.cols).packed_words,))
        _header(f, f"{name}.scales", spec.scales.numpy, groups)
        if spec.symmetric and f"{name}.offsets" in f.tensors:
            raise CheckpointError(f"tensor '{name}.offsets' is in a file of symmetric format, which has none")
        if not spec.symmetric:
            _header(f, f"{name}.offsets", spec.scales.numpy, groups)
        outliers = f.read(f"{name}.outliers") if f"{name}.outliers" in f.tensors else None
        weights = None if outliers is None else _tensor(f, f"{name}.outlier_weights", np.float16,
                                                        (spec.rows, outliers.size))
        if outliers is None and f"{name}.outlier_weights" in f.tensors:
            raise CheckpointError(f"tensor '{name}.outlier_weights' is in the file without its channels")
        try:
            check_outliers(outliers, weights, spec.rows, spec.cols)
        except ValueError as e:
            raise CheckpointError(f"'{name}': {e}") from e
        return cls(f, name, spec, order, outliers, weights if order is None or weights is None else weights[order])

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers is None else self.outliers.size

    def load(self) -> QuantizedWeights:
        f, spec, lay = self.file, self.spec, stored_layout(self.spec.bits, self.spec.rows, self.spec.cols)
        words = f.read(f"{self.name}.words").reshape(lay.tiles, lay.chunks, lay.words, lay.tile_rows)
        q = QuantizedWeights(unpack_codes(words, lay), f.read(f"{self.name}.scales"),
                             None if spec.symmetric else f.read(f"{self.name}.offsets"))
        q = q if self.order is None else q.take_rows(self.order)
        return replace(q, outliers=self.outliers, outlier_weights=self.outlier_weights)


def save(path: Path, weights: Weights, tokenizer: Tokenizer, source_sha256: str) -> None:
    q, c = weights.quant, weights.config
    tensors: dict[str, np.ndarray] = {"norm": weights.norm}
    for i, layer in enumerate(weights.layers):
        tensors[f"layers.{i}.attn_norm"], tensors[f"layers.{i}.ffn_norm"] = layer.attn_norm, layer.ffn_norm
        for role in ROLES:
            m = getattr(layer, role.name)
            if role.interleave > 1:  # files keep the parts stacked
                m = take_rows(m, np.argsort(role.order(c)))
            tensors |= _stored(f"layers.{i}.{role.name}", m, q.kernel_spec(*role.shape(c)))
    tensors |= _stored("head", weights.head, q.kernel_spec(*HEAD.shape(c), head=True))
    if not c.tied_embeddings:
        tensors |= _stored("embed", weights.embed, q.kernel_spec(*HEAD.shape(c), head=True))
    meta = {"format": FORMAT, "version": VERSION, "config": c.to_dict(), "quant": asdict(q),
            "source_sha256": source_sha256, "tokenizer": tokenizer.to_json()}
    write_safetensors(path, tensors, {"qigen": json.dumps(meta)})


def load_file(path: Path) -> tuple[Weights, Tokenizer, dict]:
    """A .qigen file → its weights (the linear layers' still in the file, each checked: StoredWeights), its tokenizer
    and its metadata; clear errors for anything else."""
    try:
        f = Safetensors(path)
        meta = json.loads(f.metadata.get("qigen", "{}"))
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable qigen model file: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qigen model file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is qigen model format version {meta.get('version')}; "
                              f"this qigen reads version {VERSION}: re-quantize it")
    try:
        if not all(isinstance(meta.get(k), dict) for k in ("config", "quant")):
            raise CheckpointError("its metadata lacks the config or the quantization spec")
        config, q = LlamaConfig.from_dict(meta["config"]), QuantSpec(**meta["quant"])
        if not isinstance(meta.get("tokenizer"), str):
            raise CheckpointError("its metadata holds no tokenizer")
        tokenizer = Tokenizer.from_json(meta["tokenizer"])
    except (CheckpointError, SpecError, TokenizerError, TypeError) as e:  # TypeError: a field QuantSpec lacks
        raise CheckpointError(f"{path}: {e}") from e

    def product(i: int, role) -> StoredWeights:
        return StoredWeights.open(f, f"layers.{i}.{role.name}", q.kernel_spec(*role.shape(config)),
                                  role.order(config) if role.interleave > 1 else None)

    norm = lambda name: _tensor(f, name, np.float32, (config.hidden,))
    try:
        if config.layers > len(f.tensors):  # (before listing what a config promises)
            raise CheckpointError(f"a model of {config.layers} layers, in a file of {len(f.tensors)} tensors")
        layers = [Layer(attn_norm=norm(f"layers.{i}.attn_norm"), ffn_norm=norm(f"layers.{i}.ffn_norm"),
                        **{r.name: product(i, r) for r in ROLES}) for i in range(config.layers)]
        head_spec = q.kernel_spec(*HEAD.shape(config), head=True)
        head = StoredWeights.open(f, "head", head_spec).load()  # in memory: the token lookups read it too
        if config.tied_embeddings:
            embed = head
        elif "embed.words" in f.tensors:
            embed = StoredWeights.open(f, "embed", head_spec).load()
        else:  # written before embeddings were kept in the head's format
            embed = quantize_rows(_tensor(f, "embed", np.float16, HEAD.shape(config)), head_spec)
        weights = Weights(config, embed, layers, norm("norm"), head, q)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path} is incomplete or was made for another spec: {e}") from e
    return weights, tokenizer, meta


def build_model(weights: Weights, tokenizer: Tokenizer, threads: int | None = None, fused: bool = True,
                kv_cache: str = DEFAULT_KV_CACHE) -> Model:
    """A model on kernels generated for this CPU: matrix-vector and matrix-matrix kernels for every product, with
    the best predicted schedule, and (fused) the decode step on them with its KV cache in the format kv_cache
    (qigen.kvcache), in one library (compiled once, then cached). fp32 weights run on numpy."""
    if weights.quant is None:
        return Model(weights, tokenizer, threads, kv_cache=kv_cache)
    kv_cache_format(kv_cache, weights.config)  # (a clear error before anything compiles)
    host = bandwidth.measured(detect())
    threads = threads or host.cores
    spec = StepSpec.uniform(weights.config, weights.quant, best_isa(host), kv_cache)
    steps = (spec,) if fused else ()
    prefill = {s: prefill_spec(s, PREFILL_BATCH) for s in spec.kernel_specs()}  # decode spec → its prefill twin
    # prefill reads decode's packing where a matrix-matrix schedule can: one copy of the weights
    lib = build([*prefill, *prefill.values()], host, threads, steps, share={p: s for s, p in prefill.items()})
    kernels = Kernels(spec, {s: lib.kernels[s] for s in prefill}, {s: lib.kernels[p] for s, p in prefill.items()},
                      lib.steps.get(spec))
    return Model(weights, tokenizer, threads, kernels, kv_cache)


CALIBRATION = Path(__file__).with_name("calibration.txt")  # the default calibration text: licenses no benchmark
# scores (Apache-2.0, MPL-2.0, Artistic)
SAMPLE_EVERY = 16  # calibration tokens per input row kept to measure layers' output errors


class Calibration(NamedTuple):
    hessians: dict[str, np.ndarray]  # per linear layer: 2/n·XᵀX of its inputs (float64)
    inputs: dict[str, np.ndarray]  # per linear layer: every SAMPLE_EVERY-th input row (float32)


def calibrate(ckpt: Checkpoint, text: str, ctx: int = 512, windows: int = 8) -> Calibration:
    """Every linear layer's input statistics from the fp32 model over calibration text: at least one window of
    `ctx` tokens, at most `windows`."""
    model = Model(split_linears(ckpt), ckpt.tokenizer, threads=None)
    hessians: dict[str, np.ndarray] = {}
    inputs: dict[str, list[np.ndarray]] = {}
    for i, lin in enumerate(model.linears):
        for n, linear in lin.items():
            name, decode = f"layers.{i}.{n}", linear.decode

            def tap(x, threads, name=name, decode=decode):
                x64 = x.astype(np.float64)
                hessians[name] = hessians.get(name, 0) + x64.T @ x64
                inputs.setdefault(name, []).append(x[::SAMPLE_EVERY].astype(np.float32))
                return decode(x, threads)

            linear.decode = linear.prefill = tap
    ids = ckpt.tokenizer.encode(text)
    if len(ids) < ctx:
        raise ValueError(f"the calibration text is {len(ids)} tokens: at least one window of {ctx} is needed (--calib)")
    count = 0
    for start in range(0, min(len(ids), ctx * windows), ctx):
        window = ids[start:start + ctx]
        model.forward(window, model.new_state(len(window)), all_logits=False)
        count += len(window)
    return Calibration({k: 2.0 * v / count for k, v in hessians.items()},
                       {k: np.concatenate(v) for k, v in inputs.items()})


def quantize_model(source: str | Path | None, quant: QuantSpec, out: Path, calib_text: str | None = None,
                   act_order: bool = False, progress: Callable[[str], None] = _log) -> Path:
    """Offline: load a checkpoint (GGUF or Hugging Face), quantize it by RTN or GPTQ, keeping quant.outliers
    input channels per layer in floating point (auto: chosen per layer by measurement), and write a .qigen file.
    GPTQ and outliers calibrate on `calib_text`, by default the text shipped as qigen/calibration.txt; with
    calibration (GPTQ, outliers, or calib_text given), rounding weighs each input by its Σx² (quant.quantize)."""
    ckpt = load_checkpoint(source or default_model(progress))
    weights = split_linears(ckpt)
    if quant.method not in ("rtn", "gptq"):
        raise ValueError(f"method '{quant.method}' is unknown: choose rtn or gptq")
    quantizer = None
    if quant.method == "gptq" or quant.outliers != 0 or calib_text is not None:
        from qigen.gptq import gptq
        from qigen.outliers import choose

        progress("collecting calibration statistics...")
        calib = calibrate(ckpt, CALIBRATION.read_text() if calib_text is None else calib_text)

        def quantizer(m, spec, name):
            h = calib.hessians[name]

            def rtn(w, channels):  # rounding weighed by Σx², none at the outlier channels (x is zero there)
                importance = np.diag(h).astype(np.float32)
                importance[channels] = 0.0
                return quantize(w, spec, importance)

            def method(w, channels):  # GPTQ sees no input at the outlier channels
                if quant.method == "rtn":
                    return rtn(w, channels)
                hz = h.copy()
                hz[channels, :] = hz[:, channels] = 0.0
                return gptq(w, hz, spec, act_order=act_order)

            q = choose(m, spec, quant.outliers, h, calib.inputs[name], method, measure=rtn)
            k = 0 if q.outliers is None else q.outliers.size
            progress(f"{quant.method} {name} {m.shape[0]}x{m.shape[1]}" + (f", {k} outlier channels" if quant.outliers
                                                                          else ""))
            return q
    save(out, quantize_weights(weights, quant, quantizer), ckpt.tokenizer, ckpt.sha256)
    return out


def load(path: str | Path | None = None, **options):
    """A kernel set directory (written by `qigen generate`) or a model (see load_model)."""
    if path is not None and (Path(path) / "manifest.json").is_file():
        from qigen.pipeline import load as load_kernel_set

        return load_kernel_set(path)
    return load_model(path, **options)


def load_model(path: str | Path | None = None, quant: QuantSpec | None = DEFAULT_QUANT, threads: int | None = None,
               progress: Callable[[str], None] = _log, activations: str | None = None,
               kv_cache: str = DEFAULT_KV_CACHE) -> Model:
    """A .qigen file as it is; a GGUF / Hugging Face checkpoint (default: SmolLM2-135M-Instruct) quantized
    with `quant` by RTN and cached beside the kernels, or run in fp32 when quant is None. activations: decode
    with "int8", "fp32" or "auto" activations instead of the file's (or quant's) choice; the weights are the same.
    kv_cache: the KV cache's format (qigen.kvcache.FORMATS)."""
    if path is not None and Path(path).suffix == ".qigen":
        weights, tokenizer, _ = load_file(Path(path))
        return build_model(_activations(weights, activations), tokenizer, threads, kv_cache=kv_cache)
    ckpt_path = Path(path) if path is not None else default_model(progress)
    if quant is None:
        ckpt = load_checkpoint(ckpt_path)
        return Model(split_linears(ckpt), ckpt.tokenizer, threads, kv_cache=kv_cache)
    activations = activations or quant.activations
    quant = replace(quant, activations="auto")  # the cached weights do not depend on it
    stat = ckpt_path.stat()  # a changed source file gets a new cache entry
    key = hashlib.sha256(json.dumps([str(ckpt_path.resolve()), stat.st_size, stat.st_mtime_ns, asdict(quant)]).encode())
    cached = cache_dir() / "models" / f"{ckpt_path.stem}.{key.hexdigest()[:16]}.qigen"
    if not cached.is_file():
        progress(f"quantizing {ckpt_path.name} to {quant.bits}-bit, group {quant.group or 'row'} (once; cached)...")
        cached.parent.mkdir(parents=True, exist_ok=True)
        quantize_model(ckpt_path, replace(quant, method="rtn"), cached, progress=progress)
    weights, tokenizer, _ = load_file(cached)
    return build_model(_activations(weights, activations), tokenizer, threads, kv_cache=kv_cache)


def _activations(weights: Weights, activations: str | None) -> Weights:
    if activations is None or activations == weights.quant.activations:
        return weights
    return replace(weights, quant=replace(weights.quant, activations=activations))  # checks the format allows it
