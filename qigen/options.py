"""The command line's shared arguments, declared once: --bits, --group, --sym, --activations, --outliers and --kv-cache for
generate, run, perplexity, quantize and both benches (which take comma-separated lists), and one parser per kind of value."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from qigen.kvcache import DEFAULT as DEFAULT_KV_CACHE, FORMATS as KV_FORMATS, formats_help
from qigen.spec import BITS, GROUPS, MAX_OUTLIERS, activations, activations_help


class Invalid(argparse.ArgumentTypeError, ValueError):
    """A value the command line refuses: argparse prints its message; as a ValueError, callers may catch it."""


def comma_list(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    """A parser of comma-separated values, each parsed by `kind`."""
    def split(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError as e:
            raise Invalid(f"'{text}': {e}") from None
    split.__name__ = f"comma-separated {kind.__name__.strip('_')}"
    return split


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise Invalid(f"{text} is not a positive integer")
    return int(text)


def threads(text: str) -> int:
    """A thread count for this machine: from 1 to the cores this process may use (runtime.model's rule)."""
    from runtime.model import check_threads

    try:
        return check_threads(positive(text))
    except ValueError as e:
        raise Invalid(str(e)) from None


def bits(text: str) -> int:
    if not text.isdigit() or int(text) not in BITS:
        raise Invalid(f"{text} bits is not one of {', '.join(map(str, BITS))}")
    return int(text)


def group(text: str) -> int | None:
    """A group size, or 'row' (one group per row): None."""
    if text == "row":
        return None
    if not text.isdigit():
        raise Invalid(f"group '{text}' is not a number or 'row'")
    if int(text) not in GROUPS:
        raise Invalid(f"group {text} is not one of {', '.join(str(g) for g in GROUPS if g)}, row")
    return int(text)


def activation(text: str) -> str:
    if text not in activations():
        raise Invalid(f"activations {text} are not one of {', '.join(activations())}")
    return text


def outliers(text: str) -> int | str:
    """auto, or a count of outlier channels per layer: 0 to MAX_OUTLIERS."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) > MAX_OUTLIERS:
        raise Invalid(f"outliers '{text}' is not auto or a count 0 to {MAX_OUTLIERS}")
    return int(text)


def kv_cache(text: str) -> str:
    if text not in KV_FORMATS:
        raise Invalid(f"KV cache '{text}' is not one of {', '.join(KV_FORMATS)}")
    return text


def add_kv_cache(p: argparse.ArgumentParser, *, lists: bool = False) -> None:
    """--kv-cache on parser p: the KV cache's format; lists: comma-separated."""
    default = (DEFAULT_KV_CACHE,) if lists else DEFAULT_KV_CACHE
    p.add_argument("--kv-cache", type=comma_list(kv_cache) if lists else kv_cache, default=default,
                   help=f"KV cache format: {formats_help()} (default {DEFAULT_KV_CACHE})")


def add_outliers(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--outliers", type=outliers, default=0,
                   help=f"input channels per linear layer kept in floating point{what} (QUIK): a count 0 to "
                        f"{MAX_OUTLIERS}, or auto: per layer the first of 0, 4, 8, 16, 32 whose next lowers the "
                        "layer's output error on the calibration text by less than 10%% (default 0)")


def _shown(value, lists: bool) -> str:
    one = lambda v: "row" if v is None else str(v)
    return ",".join(map(one, value)) if lists else one(value)


def add_format(p: argparse.ArgumentParser, bits_default, group_default, *, lists: bool = False, sym: bool = False,
               what: str = "", defaults: tuple[str, str] | None = None) -> None:
    """--bits and --group (and --sym) on parser p; lists: comma-separated values; defaults: how the help names the
    defaults, when not as values."""
    many = comma_list if lists else (lambda kind: kind)
    shown = defaults or (_shown(bits_default, lists), _shown(group_default, lists))
    p.add_argument("--bits", type=many(bits), default=bits_default,
                   help=f"bits per weight{what}: {', '.join(map(str, BITS))} (default {shown[0]})")
    p.add_argument("--group", type=many(group), default=group_default,
                   help=f"group size{what}: {', '.join(str(g) for g in GROUPS if g)} or 'row' (default {shown[1]})")
    if sym:
        p.add_argument("--sym", action="store_true", help="symmetric quantization (no offsets)")


def add_activations(p: argparse.ArgumentParser, default, *, lists: bool = False, shown: str | None = None) -> None:
    """--activations on parser p: a family's activation type or auto; lists: comma-separated."""
    p.add_argument("--activations", type=comma_list(activation) if lists else activation, default=default,
                   help=f"activations: {activations_help()} (default {shown or _shown(default, lists)})")
