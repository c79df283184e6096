"""Run configurations: TOML files (``configs/*.toml``) read with the standard library's ``tomllib``.

``load(path)`` parses a file and checks it against :data:`SCHEMA` (known tables, known keys, their
types and allowed values), so that a typo fails at start-up with a message naming the file, the
table, the key and what would have been valid, instead of being silently ignored. It returns the
file's own values only (floats written as integers are turned into floats); defaults are the
business of whoever reads the config. ``build_compressor`` and ``optimizer_options`` turn a loaded
config into the arguments of :class:`distrib.DistributedOptimizer`.
"""

import math
import os
from dataclasses import dataclass

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, packaged as tomli
    import tomli as tomllib

from distrib.errors import DistribError


class ConfigError(DistribError, ValueError):
    """A configuration file is missing, not valid TOML, or does not match the schema."""


class SIZE:
    """Field type of sizes given as a count (int >= 1) or as a fraction (float in (0, 1))."""


@dataclass(frozen=True)
class Field:
    """One key of a table: its type, and optionally its allowed values or range."""

    type: type  # int, float, bool, str, or SIZE (an element count or a fraction of the tensor)
    choices: tuple = ()
    min: float = None
    max: float = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def describe(self):
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is SIZE:
            return "an integer >= 1 (a count) or a number in (0, 1) (a fraction)"
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        text = names[self.type]
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min}")
        if self.max is not None:
            bounds.append(f"{'<' if self.max_exclusive else '<='} {self.max}")
        return " ".join([text, " and ".join(bounds)]) if bounds else text


def _int(lo=None, hi=None):
    return Field(int, min=lo, max=hi)


def _float(lo=None, hi=None, exclusive=False, hi_exclusive=False):
    return Field(float, min=lo, max=hi, min_exclusive=exclusive, max_exclusive=hi_exclusive)


def _enum(*choices):
    return Field(str, choices=choices)


BOOL = Field(bool)
COMPRESSORS = ("none", "fp16", "bf16", "qsgd", "topk", "powersgd", "countsketch")

# Constructor arguments each compressor accepts (passed to distrib.compress.get), and those it
# cannot do without. PowerSGD has error feedback built in (its own `error_feedback` argument),
# so for it the [compressor] key goes to the constructor instead of wrapping in ErrorFeedback.
COMPRESSOR_ARGS = {
    "none": (),
    "fp16": (),
    "bf16": (),
    "qsgd": ("levels", "bucket_size", "seed"),
    "topk": ("ratio",),
    "powersgd": ("rank", "warm_start", "error_feedback", "seed"),
    "countsketch": ("rows", "cols", "k", "momentum", "seed"),
}
REQUIRED_ARGS = {"topk": ("ratio",)}

# table -> key -> Field; a nested dict is a sub-table (as in [passes.prune]).
SCHEMA = {
    "launch": {
        "nproc": _int(1),
        "transport": _enum("zmq", "mpi"),
        "servers": _int(0),
        "timeout": _float(0, exclusive=True),
    },
    "train": {
        "steps": _int(1),
        "lr": _float(0, exclusive=True),
        "batch_size": _int(1),
        "seed": _int(0),
        "momentum": _float(0, 1, hi_exclusive=True),
        "eval_every": _int(0),
        "hidden": _int(1),
    },
    "optimizer": {
        "topology": _enum("ring", "ps"),
        "backward_passes_per_step": _int(1),
        "bucket_mb": _float(0, exclusive=True),
        "mode": _enum("sync", "async", "ssp"),
        "staleness": _int(0),
        "stragglers": _int(0),
    },
    "compressor": {
        "name": _enum(*COMPRESSORS),
        "error_feedback": BOOL,
        "min_numel": _int(0),
        "levels": _int(1),
        "bucket_size": _int(1),
        "ratio": _float(0, 1, exclusive=True),
        "rank": _int(1),
        "warm_start": BOOL,
        "rows": _int(1),
        "cols": Field(SIZE),
        "k": Field(SIZE),
        "momentum": _float(0, 1, hi_exclusive=True),
        "seed": _int(0),
    },
    "amp": {
        "enabled": BOOL,
        "init_scale": _float(0, exclusive=True),
        "growth_factor": _float(1, exclusive=True),
        "backoff_factor": _float(0, 1, exclusive=True),
        "growth_interval": _int(1),
    },
    "passes": {
        "prune": {"enabled": BOOL, "amount": _float(0, 1), "every": _int(1)},
        "qat": {"enabled": BOOL, "bits": _int(2, 16)},
        "distill": {
            "enabled": BOOL,
            "teacher": Field(str),
            "temperature": _float(0, exclusive=True),
            "alpha": _float(0, 1),
        },
        "compile": {
            "enabled": BOOL,
            "mode": _enum("default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"),
        },
    },
}

# DistributedOptimizer keyword for each [optimizer] key (same names) and the [compressor] ones.
_OPTIMIZER_KEYS = tuple(SCHEMA["optimizer"])
_COMPRESSOR_OPTIONS = {"min_numel": "min_compress_numel"}
_GENERIC_COMPRESSOR_KEYS = ("name", "error_feedback", "min_numel")


def load(path):
    """Read and validate the TOML file at ``path``; returns a dict of tables."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return validate(data, source=path)


def loads(text, source="<string>"):
    """Like :func:`load` for TOML text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return validate(data, source=source)


def validate(data, source="<config>"):
    """Check a parsed config against :data:`SCHEMA`; returns a normalized copy."""
    out = _check_table(data, SCHEMA, source, ())
    comp = out.get("compressor", {})
    name = comp.get("name", "none")
    for key in comp:
        if key not in _GENERIC_COMPRESSOR_KEYS and key not in COMPRESSOR_ARGS[name]:
            accepted = ", ".join(COMPRESSOR_ARGS[name]) or "none"
            raise ConfigError(
                f"{source}: [compressor] key '{key}' is not an argument of compressor '{name}'"
                f" (its arguments: {accepted})")
    for key in REQUIRED_ARGS.get(name, ()):
        if key not in comp:
            raise ConfigError(f"{source}: [compressor] compressor '{name}' needs key '{key}'")
    return out


def _check_table(data, schema, source, where):
    out = {}
    for key, value in data.items():
        at = ".".join(where + (key,))
        table = "[" + ".".join(where) + "]" if where else "top level"
        if key not in schema:
            kind = "table" if not where or isinstance(value, dict) else "key"
            raise ConfigError(
                f"{source}: unknown {kind} '{key}' in {table}; valid: {', '.join(schema)}")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{at}' must be a table [{at}], got {_show(value)}")
            out[key] = _check_table(value, spec, source, where + (key,))
        else:
            out[key] = _check_value(value, spec, source, table, key)
    return out


def _check_value(value, spec, source, table, key):
    def fail():
        raise ConfigError(f"{source}: {table} {key} must be {spec.describe()}, got {_show(value)}")

    if spec.type is SIZE:
        if type(value) is int and value >= 1 or type(value) is float and 0 < value < 1:
            return value
        fail()
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int in Python; TOML keeps them apart, and so do we.
    if type(value) is not spec.type:
        fail()
    if spec.choices and value not in spec.choices:
        fail()
    if spec.type is float and not math.isfinite(value):
        fail()
    if spec.min is not None and (value < spec.min or (spec.min_exclusive and value == spec.min)):
        fail()
    if spec.max is not None and (value > spec.max or (spec.max_exclusive and value == spec.max)):
        fail()
    return value


def _show(value):
    return f"{type(value).__name__} {value!r}"


def build_compressor(cfg):
    """The compressor the config's ``[compressor]`` table describes, or ``None`` for no
    compression. ``error_feedback = true`` wraps it in :class:`distrib.compress.ErrorFeedback`
    (PowerSGD instead gets it as its own constructor argument: its error feedback is built in)."""
    comp = (cfg or {}).get("compressor", {})
    name = comp.get("name", "none")
    if name == "none":
        return None
    import distrib.compress  # lazily: configs are read before (and without) the heavy parts

    kwargs = {k: comp[k] for k in COMPRESSOR_ARGS[name] if k in comp}
    compressor = distrib.compress.get(name, **kwargs)
    if comp.get("error_feedback", False) and "error_feedback" not in COMPRESSOR_ARGS[name]:
        compressor = distrib.compress.ErrorFeedback(compressor)
    return compressor


def optimizer_options(cfg):
    """Keyword arguments for :class:`distrib.DistributedOptimizer` from ``[optimizer]`` and
    ``[compressor]`` (the compressor object itself comes from :func:`build_compressor`). Only
    keys present in the config appear, so the optimizer's own defaults apply to the rest."""
    cfg = cfg or {}
    opts = {k: v for k, v in cfg.get("optimizer", {}).items() if k in _OPTIMIZER_KEYS}
    for key, kwarg in _COMPRESSOR_OPTIONS.items():
        if key in cfg.get("compressor", {}):
            opts[kwarg] = cfg["compressor"][key]
    return opts
