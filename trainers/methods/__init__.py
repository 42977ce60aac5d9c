"""Contrastive methods, by name. A method is one small ``nn.Module`` whose forward returns the loss."""

from trainers.methods.base import ContrastiveMethod, StepOutput, training_step, unwrap
from trainers.methods.moco import MoCo
from trainers.methods.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {SimCLR.name: SimCLR, MoCo.name: MoCo}

__all__ = ["METHODS", "ContrastiveMethod", "MoCo", "SimCLR", "StepOutput", "training_step", "unwrap"]
