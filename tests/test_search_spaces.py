"""Search spaces: shipped files load, constraints hold by construction, bad spaces are refused precisely."""

from __future__ import annotations

import math
import re

import optuna
import pytest

from search_spaces import SearchSpace, SpaceError, load_space, parse_space
from trainers.config import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _samples(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("name", ["simclr", "moco", "contrastive", "smoke"])
def test_shipped_spaces_load_and_sample_valid_configs(name: str) -> None:
    space = load_space(name)
    assert space.version == 1 and space.name == name
    for sampled in _samples(space, 40):
        base = TrainConfig().to_dict()
        config = TrainConfig(**(base | space.derive(sampled, base)))  # validates every invariant
        if config.method == "moco":
            assert config.queue_length % config.keys_per_step == 0
            assert config.queue_length <= 65536


def test_conditional_parameters_only_for_moco() -> None:
    space = load_space("contrastive")
    samples = _samples(space, 60)
    assert {s["method"] for s in samples} == {"simclr", "moco"}
    for s in samples:
        if s["method"] == "simclr":
            assert "momentum" not in s and "queued_batches" not in s
        else:
            assert {"momentum", "queued_batches"} <= set(s)


def test_derivations_scale_lr_and_build_k_from_batches() -> None:
    base = TrainConfig().to_dict()
    linear = parse_space({"name": "x", "lr_scaling": "linear", "params": {
        "method": {"choice": ["moco"]}, "batch_size": {"choice": [512]}, "base_lr": {"choice": [0.1]},
        "queued_batches": {"choice": [8]}, "symmetric": {"choice": [True]}}})
    derived = linear.derive({"method": "moco", "batch_size": 512, "base_lr": 0.1, "queued_batches": 8,
                             "symmetric": True}, base)
    assert derived["lr"] == pytest.approx(0.2) and derived["queue_length"] == 8 * 512 * 2
    sqrt = parse_space({"name": "y", "lr_scaling": "sqrt", "params": {"base_lr": {"choice": [0.1]}}})
    lr = sqrt.derive({"base_lr": 0.1}, TrainConfig(batch_size=1024).to_dict())["lr"]
    assert lr == pytest.approx(0.1 * math.sqrt(4))


def test_momentum_choices_include_zero_and_values_near_one() -> None:
    momentum = next(p for p in load_space("moco").params if p.name == "momentum")
    assert 0.0 in momentum.choices and max(momentum.choices) >= 0.999


def test_grid_respects_conditions() -> None:
    grid = load_space("smoke").params and parse_space({"name": "g", "params": {
        "method": {"choice": ["simclr", "moco"]}, "batch_size": {"choice": [32, 64]},
        "momentum": {"choice": [0.0, 0.99], "when": {"method": "moco"}}}}).grid()
    assert len(grid) == 2 + 2 * 2
    assert all(("momentum" in p) == (p["method"] == "moco") for p in grid)


@pytest.mark.parametrize(("params", "message"), [
    ({"temperature": {"loguniform": [0.0, 1.0]}}, "parameter temperature must have 0 < low < high for loguniform, "
     "got [0.0, 1.0]"),
    ({"temperature": {"choice": [0.1, -0.2]}}, "temperature must be > 0"),
    ({"momentum": {"choice": [0.5, 1.5]}}, "momentum must satisfy 0 <= m <= 1, got 1.5"),
    ({"batch_size": {"choice": [100]}}, "parameter batch_size must be a power of two >= 2, got 100"),
    ({"queue_length": {"choice": [4096]}}, "queue_length cannot be searched directly"),
    ({"queued_batches": {"choice": [1024]}, "batch_size": {"choice": [256]}},
     "parameter queued_batches must keep K = queued_batches x keys per step <= 65536"),
    ({"method": {"choice": ["byol"]}}, "parameter method must be one of ('simclr', 'moco'), got 'byol'"),
    ({"tau": {"choice": [0.1]}}, "parameter tau is not a TrainConfig field"),
    ({"temperature": {"uniform": [0.5]}}, "parameter temperature: uniform needs [low, high], got [0.5]"),
    ({"momentum": {"choice": [0.9], "when": {"method": "moco"}}}, "condition on 'method', which is not declared"),
])
def test_invalid_spaces_are_refused_with_the_rule(params: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=re.escape(message)):
        parse_space({"name": "bad", "params": params})


def test_unknown_space_and_keys() -> None:
    with pytest.raises(SpaceError, match="space must be one of"):
        load_space("nope")
    with pytest.raises(SpaceError, match="unknown keys"):
        parse_space({"name": "x", "params": {"temperature": {"choice": [0.1]}}, "paramz": {}})


def test_yaml_is_read_with_safe_load(tmp_path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\nparams: {}\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_space(str(evil))
