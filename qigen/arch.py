"""The LLaMA architecture as one table: the config, and every matrix role of a layer with its shape, the checkpoint
tensors stacked into it and how its rows interleave.

Shapes, checkpoint reading, the bench's byte counts, the decode step's pointer slots, the qkv offsets and the
scratch sizes are all derived from `ROLES`, `HEAD` and `NORMS`; nothing else writes a layer's shapes down.

    model.embed_tokens.weight                    (vocab, hidden)
    model.layers.{i}.input_layernorm.weight      (hidden,)              attn_norm
    model.layers.{i}.self_attn.{q,k,v}_proj.weight                      qkv, stacked
    model.layers.{i}.self_attn.o_proj.weight     (hidden, heads·head_dim)  o
    model.layers.{i}.post_attention_layernorm.weight (hidden,)          ffn_norm
    model.layers.{i}.mlp.{gate,up}_proj.weight                          gate_up, stacked, rows interleaved
    model.layers.{i}.mlp.down_proj.weight        (hidden, intermediate) down
    model.norm.weight                            (hidden,)
    lm_head.weight                               (vocab, hidden), only when not tied to the embedding
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import math

import numpy as np


class CheckpointError(ValueError):
    """A model that cannot be loaded; the message names the file and what is wrong with it."""


# The largest sizes a config may state: past these a number is a corrupt file, not a model (LLaMA-3-405B has a
# vocabulary of 128256, hidden 16384, feed-forward 53248, 126 layers, 128 heads; contexts reach 10^6 tokens)
LIMITS = {"vocab_size": 1 << 22, "hidden": 1 << 17, "intermediate": 1 << 19, "layers": 1 << 12, "heads": 1 << 12,
          "kv_heads": 1 << 12, "head_dim": 1 << 12, "context": 1 << 24}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context: int
    tied_embeddings: bool

    def __post_init__(self) -> None:
        if bad := [n for n in LIMITS if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)
                   or getattr(self, n) < 1]:
            raise CheckpointError(f"config: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} must be positive integers")
        if bad := [n for n, top in LIMITS.items() if getattr(self, n) > top]:
            raise CheckpointError(f"config: {', '.join(f'{n}={getattr(self, n)} is above {LIMITS[n]}' for n in bad)}, "
                                  "more than any LLaMA-style model has: the file is corrupt")
        if self.heads % self.kv_heads:
            raise CheckpointError(f"config: {self.heads} attention heads are not a multiple of {self.kv_heads} key/value heads")
        if self.head_dim % 2:
            raise CheckpointError(f"config: head_dim={self.head_dim} is odd, RoPE rotates pairs")
        for name in ("rope_theta", "rms_eps"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"config: {name}={value!r} must be a finite positive number")
        if self.rms_eps >= 1:
            raise CheckpointError(f"config: rms_eps={self.rms_eps} must be below 1 (it is added to a mean square)")
        if not isinstance(self.tied_embeddings, bool):
            raise CheckpointError(f"config: tied_embeddings={self.tied_embeddings!r} must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        names = [f.name for f in fields(cls)]
        if missing := [n for n in names if n not in d]:
            raise CheckpointError(f"config lacks {', '.join(missing)}")
        return cls(**{n: d[n] for n in names})


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor stacked into a role: its name after `model.layers.{i}.` and its rows."""
    name: str
    rows: Callable[[LlamaConfig], int]


@dataclass(frozen=True)
class Role:
    """A matrix product of a layer: its parts stacked in order, its input size, and `interleave` > 1 when its rows
    interleave the parts in memory (gate_up: gate i at row 2i, up i at 2i + 1, so one tile holds both factors of
    silu(gate)·up)."""
    name: str
    parts: tuple[Part, ...]
    cols: Callable[[LlamaConfig], int]
    interleave: int = 1

    def shape(self, c: LlamaConfig) -> tuple[int, int]:
        return sum(p.rows(c) for p in self.parts), self.cols(c)

    def offsets(self, c: LlamaConfig) -> dict[str, int]:
        """Where each part's rows start in the stacked (not interleaved) product: qkv's q, k and v."""
        starts, at = {}, 0
        for p in self.parts:
            starts[p.name], at = at, at + p.rows(c)
        return starts

    def order(self, c: LlamaConfig) -> np.ndarray:
        """The stacked rows in memory order: the identity, or the parts' rows interleaved (files keep them stacked:
        argsort(order) turns memory order back)."""
        rows = self.shape(c)[0]
        if self.interleave == 1:
            return np.arange(rows)
        return np.arange(rows).reshape(self.interleave, -1).T.reshape(-1)

    def stack(self, c: LlamaConfig, parts: list[np.ndarray]) -> np.ndarray:
        """The parts' tensors as this role's matrix, in memory order."""
        m = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return m if self.interleave == 1 else m[self.order(c)]


_q = lambda c: c.heads * c.head_dim
_kv = lambda c: c.kv_heads * c.head_dim
_d = lambda c: c.hidden
_f = lambda c: c.intermediate

# a layer's matrix products, in the order a decode step runs them
ROLES = (
    Role("qkv", (Part("self_attn.q_proj", _q), Part("self_attn.k_proj", _kv), Part("self_attn.v_proj", _kv)), _d),
    Role("o", (Part("self_attn.o_proj", _d),), _q),
    Role("gate_up", (Part("mlp.gate_proj", _f), Part("mlp.up_proj", _f)), _d, interleave=2),
    Role("down", (Part("mlp.down_proj", _d),), _f),
)
HEAD = Role("head", (Part("lm_head", lambda c: c.vocab_size),), _d)  # the embedding's tensor when tied
NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}  # per layer, (hidden,)
ROLE_NAMES = tuple(r.name for r in ROLES)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def tensor_count(c: LlamaConfig) -> int:
    """How many tensors a LLaMA model with config `c` has, without listing them."""
    return 2 + c.layers * (len(NORMS) + sum(len(r.parts) for r in ROLES)) + (not c.tied_embeddings)


def expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA model with config `c` has, in HF names, with its shape."""
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden), "model.norm.weight": (c.hidden,)}
    for i in range(c.layers):
        p = layer_prefix(i)
        shapes |= {f"{p}{name}.weight": (c.hidden,) for name in NORMS.values()}
        shapes |= {f"{p}{part.name}.weight": (part.rows(c), role.cols(c)) for role in ROLES for part in role.parts}
    if not c.tied_embeddings:
        shapes["lm_head.weight"] = HEAD.shape(c)
    return shapes


def linear_weights(c: LlamaConfig) -> int:
    """Weights of the linear layers and the output head."""
    return c.layers * sum(int(np.prod(r.shape(c))) for r in ROLES) + int(np.prod(HEAD.shape(c)))
