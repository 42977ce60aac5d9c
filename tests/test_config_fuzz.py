"""Fuzzing the config loaders: whatever a file or a mapping holds, the only error is the documented one.

``TrainConfig.from_dict``, ``StudyConfig.from_dict`` and ``read_config_file`` raise ValueError; ``parse_space`` and
``load_space`` raise SpaceError (a ValueError). What they accept is usable: a config round-trips through its JSON,
a study folder stays inside its storage path, and every point a space can sample is a valid TrainConfig.
Derandomized (the same examples on every run) so CI is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search_spaces import SpaceError, load_space, parse_space
from search_spaces.space import DERIVED_INPUTS, KINDS
from study.config import StudyConfig, read_config_file
from trainers.config import TrainConfig, validate

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
STUDY_FIELDS = [f.name for f in dataclasses.fields(StudyConfig)]
# The message of every refused value: the field, the rule, the value (or the unknown keys / the wrong container).
# A study's space is refused by the space loader: its messages start with "space" or name the parameter.
REFUSAL = re.compile(r"^(\w+ must .+, got .+|unknown \w+ fields .+|\w+ needs a mapping .+|space .+|parameter .+)$",
                     re.DOTALL)

# What YAML and TOML can produce, and then some: huge ints, non-finite floats, bools, bytes, nesting.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64),
    st.sampled_from([2**5000, -(2**70), 10**400]), st.floats(), st.text(max_size=12), st.binary(max_size=4),
)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
# Values close to valid ones, so the fuzzer also reaches the invariants behind the type checks.
plausible = st.sampled_from([
    0, 1, 2, 3, -1, 7, 32, 64, 100, 256, 4096, 65536, 2**63, 10**400, 2**5000, 0.0, 0.1, 0.5, 1.0, 1.5, 1e-9, 1e300,
    math.nan, math.inf,
    True, False, "", "simclr", "moco", "cpu", "cuda", "cuda:1", "cudax", "auto", "fashion_mnist", "imagefolder",
    "smoke", "contrastive", "nope", "../x", "x.yaml", "studies", "s3://bucket/p", "/", "a/b", "..", ".", "a\\..\\b",
    "ok-name", "a\x00b", "tpe", "grid", "asha", "none", "in_process", "127.0.0.1",
])
values = st.one_of(plausible, plausible, anything)
keys = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans())


def _mapping(fields: list[str]) -> st.SearchStrategy[dict[Any, Any]]:
    one = st.tuples(st.sampled_from(fields), values).map(lambda item: dict([item]))  # deep: the rest are defaults
    known = st.dictionaries(st.sampled_from(fields), values, max_size=6)
    return st.one_of(one, known, st.dictionaries(keys, values, max_size=3))


def _only_documented_refusals(build: Any, data: Any) -> Any:
    try:
        return build(data)
    except ValueError as error:
        assert REFUSAL.match(str(error)), f"unclear message: {str(error)[:300]}"
        return None


@settings(FUZZ, max_examples=600)
@given(_mapping(TRAIN_FIELDS))
def test_train_config_from_dict_raises_only_value_error(data: dict) -> None:
    config = _only_documented_refusals(TrainConfig.from_dict, data)
    if config is not None:
        assert TrainConfig.from_dict(json.loads(config.to_json())) == config  # what is accepted can be saved
        if config.device != "auto":
            torch.device(config.device)  # and used


@settings(FUZZ, max_examples=600)
@given(_mapping(STUDY_FIELDS))
def test_study_config_from_dict_raises_only_value_error(data: dict) -> None:
    study = _only_documented_refusals(StudyConfig.from_dict, data)
    if study is not None:
        assert StudyConfig.from_dict(json.loads(study.to_json())) == study
        # the study folder is one level below storage_path, never above or beside it
        assert posixpath.dirname(posixpath.normpath(study.study_dir)) == posixpath.normpath(study.storage_path)


# Every field meets every awkward value a YAML or TOML file can hold (exhaustive, where random draws are rare).
EDGES = [None, True, False, 0, -1, 2**63, -(2**63) - 1, 10**400, 2**5000, -0.0, 1e-320, math.nan, math.inf,
         -math.inf, "", "0", "\x00", "x" * 10_000, b"1", [], [1], {}, {"a": 1}, (1,), {1}]


def test_every_field_meets_every_edge_value_with_a_value_error_or_a_valid_config() -> None:
    for cls, fields in ((TrainConfig, TRAIN_FIELDS), (StudyConfig, STUDY_FIELDS)):
        for field in fields:
            for value in EDGES:
                config = _only_documented_refusals(cls.from_dict, {field: value})
                if config is not None:
                    assert cls.from_dict(json.loads(config.to_json())) == config


def _yaml_text(data: dict) -> str:
    try:
        return yaml.safe_dump(data)
    except yaml.YAMLError:
        return "{}"


toml_values = st.sampled_from(['1', '"x"', "true", "1.5", "nan", "inf", "-0", "[1, 2]", "{a = 1}", "1979-05-27",
                               "0x10", "1_000", '"smoke"', "3", "0", "99999999999999999999", '"../x"', "[[1]]"])
toml_text = st.lists(st.tuples(st.sampled_from([*STUDY_FIELDS, "x", "a.b"]), toml_values), max_size=5).map(
    lambda lines: "".join(f"{k} = {v}\n" for k, v in lines))
file_texts = st.one_of(
    st.text(max_size=80), toml_text, _mapping(STUDY_FIELDS).map(_yaml_text),
    st.sampled_from(["name: !!python/object/apply:os.system ['true']", "[" * 2000, "a: " + "9" * 5000,
                     "? [a, b]\n: 1", "a: &x [*x]", "\x00", "name: [1, 2"]),
)


@FUZZ
@given(text=st.one_of(file_texts, st.binary(max_size=40)), suffix=st.sampled_from([".yaml", ".yml", ".toml", ""]))
def test_read_config_file_raises_only_value_error(text: str | bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"study{suffix}"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            values = read_config_file(str(path))
        except ValueError as error:
            assert str(path) in str(error)  # a file problem names the file
            return
        assert isinstance(values, dict)
        _only_documented_refusals(StudyConfig.from_dict, values)


# Search spaces: mostly well-formed specifications with plausible values, sometimes anything at all.
space_values = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 16, 32, 64, 128, 256, 1024, 2**20, 0.0, 0.01, 0.2, 0.5, 0.99, 1.0, 2.5, 1e300,
                     math.nan, math.inf, -1, True, "simclr", "moco", "sgd", "lars", "x", 2**5000]),
    scalars,
)
kind_spec = st.one_of(
    st.builds(lambda kind, args: {kind: args}, st.sampled_from(KINDS), st.lists(space_values, min_size=1, max_size=4)),
    st.builds(lambda kind, args: {kind: args, "when": {"method": "moco"}}, st.sampled_from(KINDS),
              st.lists(space_values, min_size=1, max_size=3)),
    st.dictionaries(st.sampled_from([*KINDS, "when", "x"]), anything, max_size=3),
    anything,
)
param_names = st.one_of(st.sampled_from([*TRAIN_FIELDS, *DERIVED_INPUTS]), keys)
spaces = st.one_of(
    st.fixed_dictionaries({"params": st.dictionaries(param_names, kind_spec, max_size=4)},
                          optional={"name": st.one_of(st.text(max_size=8), scalars),
                                    "version": st.one_of(st.integers(), scalars),
                                    "lr_scaling": st.sampled_from(["linear", "sqrt", "none", "cubic", 1])}),
    st.dictionaries(keys, anything, max_size=4),
    anything,
)


class RandomSuggester:
    """Samples like Optuna's RandomSampler (within the bounds), without a study."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        value = math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high)
        return min(max(value, low), high)

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.rng.choice(choices)


@FUZZ
@given(spaces)
def test_parse_space_raises_only_space_error_and_accepted_spaces_sample_valid_configs(data: Any) -> None:
    try:
        space = parse_space(data)
    except SpaceError as error:
        assert REFUSAL.match(str(error)) or str(error).startswith("<dict>: "), f"unclear: {str(error)[:300]}"
        return
    base = TrainConfig().to_dict()
    try:
        space.check(base, world_size=2)  # what a study with 2 workers per trial checks before Ray starts
        world_sizes = (1, 2)
    except SpaceError:
        world_sizes = (1,)
    for seed in range(20):
        sampled = space.sample(RandomSuggester(seed))
        config = TrainConfig(**(base | space.derive(sampled, base)))  # raises if the space lied
        for world_size in world_sizes:
            validate(config, world_size=world_size)


@pytest.mark.parametrize(("params", "message"), [
    # Accepted before although sampling could leave them: valid at both ends, invalid in between.
    ({"epochs": {"choice": [1, 2.5, 3]}}, "parameter epochs must be an integer, got 2.5"),
    ({"batch_size": {"int": [2, 256]}}, "parameter batch_size must be a choice"),
    ({"method": {"choice": ["moco"]}, "queued_batches": {"int": [1, 16]}}, "parameter queued_batches must be a choice"),
    # Values that made the loader itself crash (TypeError, OverflowError, ValueError while formatting).
    ({"base_lr": {"choice": [10**400]}}, "parameter base_lr must be > 0 (and finite), got 1000000"),
    ({"queued_batches": {"choice": [2**20000]}}, "parameter queued_batches must be a power of two in [1, 65536], "
     "got <an integer of 20001 bits>"),
    ({1: {"choice": [1]}, "x": {"choice": [1]}}, "parameter names must be strings, got 1"),
    ({"temperature": {"uniform": [0.1, 10**400]}}, "parameter temperature: uniform needs [low, high]"),
])
def test_spaces_that_broke_the_loader_or_lied_are_refused(params: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        parse_space({"name": "x", "params": params})


@FUZZ
@given(file_texts)
def test_load_space_raises_only_space_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "space.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_space(str(path))
        except SpaceError as error:  # the file's own problems name it; a bad parameter is named itself
            message = str(error)
            assert message.startswith((f"{path}: ", f"space file {str(path)!r}", "parameter")) \
                or REFUSAL.match(message), f"unclear message: {message[:300]}"
