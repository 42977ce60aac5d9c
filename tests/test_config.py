"""TrainConfig: every invariant refused with a message naming the field, the rule and the value; the CLI."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from study.config import StudyConfig
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
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0, got -0.0001"),
    ({"projection_dim": 0}, "projection_dim must be >= 1, got 0"),
    ({"projection_hidden_dim": -1}, "projection_hidden_dim must be >= 0, got -1"),
    ({"val_size": 0}, "val_size must be >= 1, got 0"),
    ({"probe_train_subset": -1}, "probe_train_subset must be >= 0, got -1"),
    ({"test_subset": -5}, "test_subset must be >= 0, got -5"),
    ({"loader_workers": -1}, "loader_workers must be >= 0, got -1"),
    ({"finetune_epochs": -1}, "finetune_epochs must be >= 0, got -1"),
    ({"monitor_bank_size": -1}, "monitor_bank_size must be >= 0, got -1"),
    ({"monitor_query_size": 0}, "monitor_query_size must be >= 1, got 0"),
    ({"blur_probability": 1.5}, "blur_probability must lie in [0, 1], got 1.5"),
    ({"knn_k": 0}, "knn_k must be >= 1, got 0"),
    ({"knn_temperature": -0.1}, "knn_temperature must be > 0, got -0.1"),
    ({"optimizer": "adam"}, "optimizer must be one of ('sgd', 'adamw', 'lars'), got 'adam'"),
    ({"bn_mode": "ghost"}, "bn_mode must be one of ('shuffle', 'sync', 'local'), got 'ghost'"),
    ({"device": "cudax"}, "device must be auto, cpu or cuda[:N], got 'cudax'"),
    ({"cifar_stem": "yes"}, "cifar_stem must be true or false, got 'yes'"),
    ({"probe": None}, "probe must be true or false, got None"),
    ({"baselines": 0}, "baselines must be true or false, got 0"),
    ({"data_root": 3}, "data_root must be a string, got 3"),
    ({"split_seed": True}, "split_seed must be an integer, got True"),  # YAML's true is no number
    ({"seed": 2**64}, "seed must fit in 64 bits (Parquet and torch seeds), got 18446744073709551616"),
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"momentum": 10**5000}, "momentum must be a finite number, got <an integer of 16610 bits>"),
    ({"batch_size": 64, "queue_length": 64, "method": "moco", "epochs": 2, "warmup_epochs": 2},
     "warmup_epochs must lie in [0, epochs=2), got 2"),
])
def test_invalid_values_are_refused_with_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        TrainConfig(**changes)
    field, _ = message.split(" must ", 1)
    assert re.fullmatch(rf"{field} must .+, got .+", str(error.value))  # the field, the rule, the value


def test_every_train_config_field_has_a_refusal_test() -> None:
    table = test_invalid_values_are_refused_with_the_rule.pytestmark[0].args[1]
    refused = {message.split(" must ", 1)[0] for _, message in table}
    assert refused == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": "../x"}, "name must be a plain folder name (1-255 characters; no '/', '\\' or control characters; "
     "not starting with '.'), got '../x'"),
    ({"space": "nope"}, "space must be one of ['contrastive', 'moco', 'simclr', 'smoke'] or a path to a .yaml file, "
     "got 'nope'"),
    ({"dataset": "mnist"}, "dataset must be one of ('fashion_mnist', 'cifar10', 'stl10', 'imagefolder'), got 'mnist'"),
    ({"data_root": None}, "data_root must be a string, got None"),
    ({"backbone": "vit"}, "backbone must be one of ('resnet_small', 'resnet18', 'resnet50'), got 'vit'"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"pretrain_subset": -1}, "pretrain_subset must be >= 0, got -1"),
    ({"probe_train_subset": -1}, "probe_train_subset must be >= 0, got -1"),
    ({"val_size": 0}, "val_size must be >= 1, got 0"),  # from the TrainConfig every trial builds
    ({"test_subset": -1}, "test_subset must be >= 0, got -1"),
    ({"monitor_bank_size": 0}, "monitor_bank_size must be >= 1, got 0"),
    ({"monitor_query_size": 0}, "monitor_query_size must be >= 1, got 0"),
    ({"num_trials": 0}, "num_trials must be >= 1, got 0"),
    ({"replicates": 0}, "replicates must be >= 1, got 0"),
    ({"workers_per_trial": 0}, "workers_per_trial must be >= 1, got 0"),
    ({"cpus_per_worker": -1.0}, "cpus_per_worker must be >= 0 (0 = auto), got -1.0"),
    ({"gpus_per_worker": float("nan")}, "gpus_per_worker must be a finite number, got nan"),
    ({"trial_mode": "in_process", "workers_per_trial": 2},
     "trial_mode must be ray_train or auto when workers_per_trial > 1"),
    ({"max_concurrent_trials": -1}, "max_concurrent_trials must be >= 0, got -1"),
    ({"searcher": "bohb"}, "searcher must be one of ('tpe', 'random', 'grid'), got 'bohb'"),
    ({"scheduler": "pbt"}, "scheduler must be one of ('asha', 'asha_promotion', 'none'), got 'pbt'"),
    ({"scheduler": "asha_promotion", "workers_per_trial": 2},
     "scheduler must be asha or none when trials train in Ray Train worker groups"),
    ({"grace_epochs": 7}, "grace_epochs must be <= epochs (6), got 7"),
    ({"reduction_factor": 1}, "reduction_factor must be >= 2, got 1"),
    ({"objective": "linear_test_accuracy"}, "objective must be one of ('linear_val_accuracy', 'knn_val_accuracy'), "
     "got 'linear_test_accuracy'"),
    ({"baselines": "no"}, "baselines must be true or false, got 'no'"),
    ({"storage_path": " "}, "storage_path must be a folder or URI (empty would put the study at the filesystem root), "
     "got ' '"),
    ({"address": 6379}, "address must be a string, got 6379"),
    ({"dashboard_host": ["0.0.0.0"]}, "dashboard_host must be a string, got ['0.0.0.0']"),
    ({"max_failures": -1}, "max_failures must be >= 0, got -1"),
    ({"seed": 1.0}, "seed must be an integer, got 1.0"),
])
def test_invalid_study_values_are_refused_with_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        StudyConfig.from_dict(changes)
    assert re.search(r"\w+ must .+, got .+", str(error.value))  # the field, the rule, the value


def test_every_study_config_field_has_a_refusal_test() -> None:
    table = test_invalid_study_values_are_refused_with_the_rule.pytestmark[0].args[1]
    refused = {message.split(" must ", 1)[0] for _, message in table}
    assert refused == {f.name for f in dataclasses.fields(StudyConfig)}


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
