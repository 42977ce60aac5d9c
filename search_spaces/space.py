"""Declarative search spaces: typed parameters, MoCo-only conditions, constraints that hold by construction.

A space is a YAML file (read with ``yaml.safe_load``) or the same structure built in Python::

    name: moco
    version: 1
    lr_scaling: linear          # lr = base_lr * batch_size / 256   (sqrt: base_lr * sqrt(batch_size / 256))
    params:
      method: {choice: [moco]}
      temperature: {loguniform: [0.03, 1.0]}
      batch_size: {choice: [128, 256]}
      base_lr: {loguniform: [0.01, 1.0]}
      momentum: {choice: [0.0, 0.9, 0.99, 0.999], when: {method: moco}}
      queued_batches: {choice: [4, 16, 64], when: {method: moco}}

Rather than sampling MoCo's queue length K and hoping it divides, a space samples ``queued_batches`` and derives
``K = queued_batches x keys per step`` (global batch, x 2 with the symmetric loss), so ``K % batch == 0`` always
holds; the learning rate is derived from the batch size by the space's scaling rule. ``when`` makes a parameter
conditional: it is only sampled (and only recorded) when the named parameter has that value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from trainers.config import METHOD_NAMES, TrainConfig, check_field_type, show, validate

KINDS = ("loguniform", "uniform", "int", "choice")
LR_SCALING = ("linear", "sqrt", "none")
REFERENCE_BATCH = 256
MAX_QUEUE_LENGTH = 65536
# Sampled names that are not TrainConfig fields: they are turned into fields by SearchSpace.derive.
DERIVED_INPUTS = ("base_lr", "queued_batches")
# Divisibility (K % batch, batch % workers) and powers of two do not hold between two valid ends of a range, so
# these are searched only as explicit choices, every one of which is checked.
CHOICE_ONLY = ("batch_size", "queued_batches")
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SHIPPED = Path(__file__).resolve().parent


class Suggester(Protocol):
    """What a define-by-run search needs (``optuna.trial.Trial`` satisfies it)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = ...) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


class SpaceError(ValueError):
    """An invalid search space; the message names the parameter, the rule and the value."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, Any], ...] = ()

    def candidates(self) -> tuple[Any, ...]:
        """Values that bound what this parameter can take: both ends of a range or of numeric choices."""
        if self.kind == "choice":
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.choices)
            return (min(self.choices), max(self.choices)) if numeric else self.choices
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (self.low, self.high)

    def sample(self, suggest: Suggester) -> Any:
        if self.kind == "choice":
            return suggest.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return suggest.suggest_int(self.name, int(self.low), int(self.high))
        return suggest.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(name) == value for name, value in self.when)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    params: tuple[Param, ...]
    version: int = 1
    lr_scaling: str = "linear"

    def __post_init__(self) -> None:
        validate_space(self)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def sample(self, suggest: Suggester) -> dict[str, Any]:
        """Define-by-run sampling in declaration order; conditional parameters only when their condition holds."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.sample(suggest)
        return values

    def derive(self, sampled: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
        """TrainConfig overrides for sampled values: the scaled lr and K from the number of queued batches.

        ``base`` holds the TrainConfig values the sampled ones are applied to (``TrainConfig().to_dict()``).
        """
        overrides = {k: v for k, v in sampled.items() if k not in DERIVED_INPUTS}
        batch = overrides.get("batch_size", base["batch_size"])
        if "base_lr" in sampled:
            scale = {"linear": batch / REFERENCE_BATCH, "sqrt": math.sqrt(batch / REFERENCE_BATCH), "none": 1.0}
            overrides["lr"] = sampled["base_lr"] * scale[self.lr_scaling]
        if "queued_batches" in sampled:
            symmetric = overrides.get("symmetric", base["symmetric"])
            overrides["queue_length"] = int(sampled["queued_batches"]) * batch * (2 if symmetric else 1)
        return overrides

    def check(self, base: Mapping[str, Any], *, world_size: int = 1) -> None:
        """Build a TrainConfig at every extreme point of the space on top of ``base``, so every invariant that
        TrainConfig knows (with ``world_size`` workers) is checked before anything runs."""
        for point in itertools.product(*(p.candidates() for p in self.params)):
            values = dict(zip(self.names, point))
            active = {p.name: values[p.name] for p in self.params if p.active(values)}
            overrides = self.derive(active, base)
            if overrides.get("queue_length", 0) > MAX_QUEUE_LENGTH:
                raise _fail("queued_batches", f"keep K = queued_batches x keys per step <= {MAX_QUEUE_LENGTH}",
                            f"{active.get('queued_batches')} (K = {overrides['queue_length']})")
            try:
                validate(TrainConfig(**(dict(base) | overrides)), world_size=world_size)
            except ValueError as error:
                raise SpaceError(f"space {self.name!r} can sample an invalid configuration {show(active)}: "
                                 f"{error}") \
                    from None

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of a space made only of choices, conditions respected (for grid search)."""
        ranged = [p.name for p in self.params if p.kind != "choice"]
        if ranged:
            raise SpaceError(f"grid search needs only choice parameters; {ranged} are ranges in space {self.name!r}")
        points: list[dict[str, Any]] = [{}]
        for param in self.params:
            points = [
                expanded
                for point in points
                for expanded in ([point | {param.name: c} for c in param.choices] if param.active(point) else [point])
            ]
        return points

    def to_dict(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for p in self.params:
            spec: dict[str, Any] = {p.kind: list(p.choices) if p.kind == "choice" else [p.low, p.high]}
            if p.when:
                spec["when"] = dict(p.when)
            params[p.name] = spec
        return {"name": self.name, "version": self.version, "lr_scaling": self.lr_scaling, "params": params}


def parse_space(data: Any, *, source: str = "<dict>") -> SearchSpace:
    """Build a SearchSpace from the YAML structure, refusing anything malformed with a precise message."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "version", "lr_scaling", "params"}, key=repr)  # keys of any YAML type
    if unknown:
        raise SpaceError(f"{source}: unknown keys {unknown}; allowed: name, version, lr_scaling, params")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpaceError(f"{source}: params must be a non-empty mapping of parameter -> distribution")
    params = []
    for name, spec in raw_params.items():
        if not isinstance(name, str):
            raise SpaceError(f"{source}: parameter names must be strings, got {show(name)}")
        if not isinstance(spec, dict):
            raise SpaceError(f"parameter {name}: expected a mapping like {{choice: [...]}}, got {show(spec)}")
        kinds = [k for k in spec if k in KINDS]
        extra = sorted(set(spec) - set(KINDS) - {"when"}, key=repr)
        if len(kinds) != 1 or extra:
            raise SpaceError(f"parameter {name}: give exactly one of {KINDS} (and optionally when), got {show(spec)}")
        kind, arguments = kinds[0], spec[kinds[0]]
        when = spec.get("when", {})
        if not isinstance(when, dict):
            raise SpaceError(f"parameter {name}: when must be a mapping like {{method: moco}}, got {show(when)}")
        if kind == "choice":
            if not isinstance(arguments, list) or not arguments:
                raise SpaceError(f"parameter {name}: choice must be a non-empty list, got {show(arguments)}")
            params.append(Param(name, kind, choices=tuple(arguments), when=tuple(when.items())))
        else:
            if not (isinstance(arguments, list) and len(arguments) == 2 and all(map(_is_real, arguments))):
                raise SpaceError(f"parameter {name}: {kind} needs [low, high], got {show(arguments)}")
            params.append(Param(name, kind, low=float(arguments[0]), high=float(arguments[1]),
                                when=tuple(when.items())))
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 2**31:
        raise SpaceError(f"{source}: version must be an integer >= 1, got {show(version)}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise SpaceError(f"{source}: name must be a string, got {show(name)}")
    return SearchSpace(name=name, params=tuple(params), version=version, lr_scaling=data.get("lr_scaling", "linear"))


def _is_real(value: Any) -> bool:
    """An int or float (not a bool) that converts to a float: bounds are stored as floats."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:  # an int beyond float range (YAML reads 1e400 as inf, but 10**400 as an int)
        return False
    return True


def load_space(name_or_path: str) -> SearchSpace:
    """A shipped space by name (``simclr``, ``moco``, ``contrastive``, ``smoke``) or a YAML file by path.

    Every way a file can be unusable (missing, unreadable, not UTF-8, not YAML) is a SpaceError naming it.
    """
    shipped = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    path = Path(name_or_path)
    if not path.suffix:
        if name_or_path not in shipped:  # a name, never a path: "../x" does not reach files outside SHIPPED
            raise SpaceError(f"space must be one of {shipped} or a path to a .yaml file, got {name_or_path!r}")
        path = SHIPPED / f"{name_or_path}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"space file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path, or bytes that are not UTF-8
        raise SpaceError(f"space file {str(path)!r} cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: an int of > 4300 digits
        raise SpaceError(f"space file {str(path)!r} is not valid YAML: {error}") from None
    return parse_space(data, source=str(path))


def _fail(param: str, rule: str, value: Any) -> SpaceError:
    return SpaceError(f"parameter {param} must {rule}, got {show(value)}")


def validate_space(space: SearchSpace) -> None:
    """Every parameter is known, well-formed and within its invariant, for every value it can take."""
    if space.lr_scaling not in LR_SCALING:
        raise _fail("lr_scaling", f"be one of {LR_SCALING}", space.lr_scaling)
    names = [p.name for p in space.params]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpaceError(f"parameters {duplicates} are declared twice")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for p in space.params:
        if p.name not in fields and p.name not in DERIVED_INPUTS:
            raise SpaceError(f"parameter {p.name} is not a TrainConfig field nor one of {DERIVED_INPUTS}")
        if p.name == "queue_length":
            raise SpaceError("parameter queue_length cannot be searched directly: search queued_batches, and K = "
                             "queued_batches x global batch holds K % batch == 0 by construction")
        if p.name == "lr" and "base_lr" in names:
            raise SpaceError("parameters lr and base_lr exclude each other (lr is derived from base_lr)")
        if p.kind == "loguniform" and not 0 < p.low < p.high:
            raise _fail(p.name, "have 0 < low < high for loguniform", [p.low, p.high])
        if p.kind in ("uniform", "int") and not p.low < p.high:
            raise _fail(p.name, f"have low < high for {p.kind}", [p.low, p.high])
        if p.kind == "int" and not (p.low.is_integer() and p.high.is_integer()):
            raise _fail(p.name, "have integer bounds", [p.low, p.high])
        for condition, _ in p.when:
            if condition not in names[: names.index(p.name)]:
                raise SpaceError(f"parameter {p.name}: condition on {show(condition)}, which is not declared before it")
        if p.name in CHOICE_ONLY and p.kind != "choice":
            raise _fail(p.name, "be a choice (a range can sample values between valid ends that break "
                        "divisibility)", p.kind)
        for value in p.choices if p.kind == "choice" else p.candidates():
            _check_value(p.name, value)
            if p.name in TRAIN_FIELDS:
                # Every choice, not only the extremes that check() combines: 2.5 between 1 and 3 is no epoch count.
                try:
                    check_field_type(TRAIN_FIELDS[p.name], value)
                except ValueError as error:
                    raise SpaceError(f"parameter {error}") from None
    space.check(TrainConfig().to_dict())


def _check_value(name: str, value: Any) -> None:
    if name == "method" and value not in METHOD_NAMES:
        raise _fail(name, f"be one of {METHOD_NAMES}", value)
    if name == "batch_size" and not (isinstance(value, int) and 2 <= value <= 2**62 and value & (value - 1) == 0):
        raise _fail(name, "be a power of two >= 2", value)
    if name == "queued_batches" and not (isinstance(value, int) and 1 <= value <= MAX_QUEUE_LENGTH
                                         and value & (value - 1) == 0):
        raise _fail(name, f"be a power of two in [1, {MAX_QUEUE_LENGTH}]", value)
    if name == "base_lr" and not (_is_real(value) and math.isfinite(value) and value > 0):
        raise _fail(name, "be > 0 (and finite)", value)
