"""TrainConfig: every invariant refused with a message naming the field, the rule and the value; the CLI."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from trainers.config import TrainConfig, validate
from trainers.pretrain import add_config_arguments, config_from_args, default_run_dir


def test_defaults_are_valid_and_roundtrip() -> None:
    config = TrainConfig()
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "message"), [
    ({"temperature": 0.0}, "temperature must be > 0 (and finite), got 0.0"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": "0.1"}, "temperature must be a finite number, got '0.1'"),
    ({"momentum": 1.01}, "momentum must satisfy 0 <= m <= 1, got 1.01"),
    ({"method": "byol"}, "method must be one of ('simclr', 'moco'), got 'byol'"),
    ({"dataset": "mnist"}, "dataset must be one of"),
    ({"backbone": "vit"}, "backbone must be one of"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"lr": -1.0}, "lr must be > 0, got -1.0"),
    ({"warmup_epochs": 10}, "warmup_epochs must lie in [0, epochs=10), got 10"),
    ({"method": "moco", "queue_length": 1000}, "queue_length must be a multiple of the keys enqueued per step (256"),
    ({"method": "moco", "queue_length": 256, "symmetric": True},
     "queue_length must be a multiple of the keys enqueued per step (512 = global batch x 2 views"),
    ({"queue_length": 0}, "queue_length must be >= 1, got 0"),
    ({"dataset": "imagefolder"}, "data_root must be set for dataset imagefolder"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda[:N], got 'tpu'"),
    ({"pretrain_subset": 100}, "pretrain_subset must hold at least one global batch (256 images), got 100"),
    ({"crop_scale_min": 0.0}, "crop_scale_min must lie in (0, 1], got 0.0"),
    ({"symmetric": 1}, "symmetric must be true or false, got 1"),
])
def test_invalid_values_are_refused_with_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**changes)


def test_world_size_must_divide_the_batch() -> None:
    config = TrainConfig(batch_size=10)
    validate(config, world_size=2)
    message = "batch_size must be divisible by the number of workers (4), got 10"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(config, world_size=4)


def test_derived_quantities() -> None:
    assert TrainConfig(method="simclr", batch_size=128).negatives_per_positive == 254
    assert TrainConfig(method="moco", batch_size=128, queue_length=4096).negatives_per_positive == 4096
    assert TrainConfig(method="moco", batch_size=128, queue_length=4096, symmetric=True).keys_per_step == 256


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['tau'\]"):
        TrainConfig.from_dict({"tau": 0.1})


def test_cli_has_one_typed_flag_per_field() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    args = parser.parse_args(["--method", "moco", "--queue-length", "512", "--temperature", "0.1", "--symmetric",
                              "--no-probe"])
    config = config_from_args(args)
    assert (config.method, config.queue_length, config.temperature, config.symmetric, config.probe) == (
        "moco", 512, 0.1, True, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "byol"])


def test_run_folder_depends_only_on_the_config() -> None:
    assert default_run_dir(TrainConfig(seed=1)) == default_run_dir(TrainConfig(seed=1))
    assert default_run_dir(TrainConfig(seed=1)) != default_run_dir(TrainConfig(seed=2))
