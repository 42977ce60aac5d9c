"""Images/s of one real SimCLR / MoCo training step against the backbone's plain work, and of a real epoch.

Part 1, the step (random views, no data loading). Interleaved round-robin in one process, one step per sample:

* ``simclr step``: ``trainers.methods.training_step`` on ``SimCLR`` (backbone + BN head on both views, ``nt_xent``,
  pair diagnostics, backward, SGD step);
* ``plain 2 x fwd+bwd``: the same backbone architecture alone, ``backbone(x1).sum() + backbone(x2).sum()``,
  backward, SGD step: the work SimCLR cannot avoid (two views with gradient);
* ``moco step``: ``training_step`` on ``MoCo`` (query encoder with gradient on view 1, momentum key encoder
  without gradient on view 2, ``info_nce`` against the queue, enqueue, momentum update);
* ``plain 1 x fwd+bwd + 1 x no-grad fwd``: the backbone with gradient on x1 and a copy of it under
  ``torch.no_grad()`` on x2 (train-mode BN, like MoCo's key encoder), SGD step: the work MoCo cannot avoid.

All models use the method's own optimizer settings (``build_optimizer``: SGD, momentum 0.9, weight decay).
Images/s counts images (pairs of views), i.e. ``batch / step time``; the ratio step/plain is the cost of the head,
loss, diagnostics and method bookkeeping on top of the backbone: the ratio of the medians, and beside it ("same
round") the median over rounds of each round's step/plain, which a drift of the machine's speed over the run moves
less. That cost is within about 1% (the backbone's passes with the head, then the loss, then the diagnostics added
took 0.99-1.01x the time of the passes alone, interleaved in a /tmp script) and one step's sample spreads by 2-5%,
hence 15 rounds.

Part 2, the epoch: ``Trainer.train_epoch()`` on a real Fashion-MNIST subset (``TrainConfig(pretrain_subset=...,
probe=False, baselines=False, monitor_bank_size=0)``) for each ``loader_workers`` value, interleaved with a
step-only run of the same number of steps on a fresh model of the same config (random views). Reported: the
epoch's own ``images_per_second`` and ``data_wait_fraction`` (share of the epoch spent waiting for augmented
batches), and epoch images/s over step-only images/s. With ``loader_workers=1`` the DataLoader starts a worker
process every epoch (``persistent_workers`` is off), and that start-up is part of the epoch, as in real runs.

Threads: torch's default (one per core here) unless ``--threads``; on this 2-core machine a busy neighbour
makes 2 threads much slower than 1 (OpenMP barriers wait for a descheduled thread), so compare runs only
at the same ``--threads`` and read the load average printed with each table.

Run (about 2.5 minutes on 2 idle cores, 4 with ``--threads 1``; ``--quick`` under 1 minute):

    .venv/bin/python benchmarks/bench_step.py
    .venv/bin/python benchmarks/bench_step.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
from _common import interleaved, machine_note, markdown_table, median, spread
from torch import Tensor, nn

from trainers.config import TrainConfig
from trainers.loop import Trainer, build_method, build_optimizer, load_data
from trainers.methods import training_step
from trainers.runtime import keep_freed_memory


def plain_two_passes(config: TrainConfig, channels: int, x1: Tensor, x2: Tensor) -> Callable[[], None]:
    """The backbone alone with gradient on both views (SimCLR's unavoidable work)."""
    backbone = build_method(config, channels).backbone
    optimizer = build_optimizer(config, backbone)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        (backbone(x1).sum() + backbone(x2).sum()).backward()
        optimizer.step()

    return step


def plain_one_pass_and_keys(config: TrainConfig, channels: int, x1: Tensor, x2: Tensor) -> Callable[[], None]:
    """The backbone with gradient on x1 and a frozen copy on x2 without gradient (MoCo's unavoidable work)."""
    backbone = build_method(config, channels).backbone
    key_backbone = copy.deepcopy(backbone)
    optimizer = build_optimizer(config, backbone)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backbone(x1).sum().backward()
        with torch.no_grad():
            key_backbone(x2)
        optimizer.step()

    return step


def method_step(config: TrainConfig, channels: int, x1: Tensor, x2: Tensor) -> Callable[[], None]:
    model: nn.Module = build_method(config, channels).train()
    optimizer = build_optimizer(config, model)
    return lambda: training_step(model, x1, x2, optimizer)


def _ips(batch: int, seconds: float) -> str:
    return f"{batch / seconds:.0f}"


def step_part(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x1, x2 = torch.randn(shape), torch.randn(shape)
    common = {"backbone": args.backbone, "batch_size": args.batch, "queue_length": args.queue}
    simclr = TrainConfig(method="simclr", **common)
    moco = TrainConfig(method="moco", **common)
    contenders = {
        "simclr step": method_step(simclr, args.channels, x1, x2),
        "plain 2 x fwd+bwd": plain_two_passes(simclr, args.channels, x1, x2),
        "moco step": method_step(moco, args.channels, x1, x2),
        "plain 1 x fwd+bwd + 1 x no-grad fwd": plain_one_pass_and_keys(moco, args.channels, x1, x2),
    }
    samples = interleaved(contenders, rounds=args.rounds, calls=1)
    s = {name: median(values) for name, values in samples.items()}
    rows = []
    for method, plain in (("simclr step", "plain 2 x fwd+bwd"), ("moco step", "plain 1 x fwd+bwd + 1 x no-grad fwd")):
        paired = median([a / b for a, b in zip(samples[method], samples[plain], strict=True)])
        rows.append([method, _ips(args.batch, s[method]), plain, _ips(args.batch, s[plain]),
                     f"{s[method] / s[plain]:.3f}x", f"{paired:.3f}x", spread(samples[method]), spread(samples[plain])])
    header = (f"## Step: {args.backbone}, {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, "
              f"MoCo queue {args.queue}, {args.rounds} interleaved rounds\n")
    return header + "\n" + markdown_table(
        ["step", "images/s", "baseline", "baseline images/s", "time step/baseline", "same round", "spread step",
         "spread baseline"],
        rows,
    )


def epoch_part(args: argparse.Namespace, method: str) -> str:
    rounds = args.epoch_rounds
    base = TrainConfig(
        method=method, backbone=args.backbone, batch_size=args.batch, queue_length=args.queue,
        pretrain_subset=args.subset, probe=False, baselines=False, monitor_bank_size=0,
        epochs=rounds + 2, device="cpu",
    )
    splits = load_data(base)  # Fashion-MNIST, loaded once and shared by every trainer
    trainers = {w: Trainer(TrainConfig.from_dict(base.to_dict() | {"loader_workers": w}), splits=splits)
                for w in args.loader_workers}
    steps = next(iter(trainers.values())).steps_per_epoch
    metrics: dict[int, list[dict[str, float]]] = {w: [] for w in trainers}

    def epoch(w: int) -> Callable[[], None]:
        return lambda: metrics[w].append(trainers[w].train_epoch())

    torch.manual_seed(1)
    channels = splits.info.channels
    shape = (args.batch, channels, splits.info.image_size, splits.info.image_size)
    step = method_step(base, channels, torch.randn(shape), torch.randn(shape))

    def step_only() -> None:
        for _ in range(steps):
            step()

    contenders: dict[str, Callable[[], None]] = {f"epoch w{w}": epoch(w) for w in trainers}
    contenders["step-only"] = step_only
    samples = interleaved(contenders, rounds=rounds, calls=1)
    for w in trainers:  # drop the warm-up round's epoch, as interleaved() dropped its timing
        metrics[w] = metrics[w][-rounds:]
    step_ips = args.batch * steps / median(samples["step-only"])
    rows = []
    for w in trainers:
        ips = median([m["images_per_second"] for m in metrics[w]])
        wait = median([m["data_wait_fraction"] for m in metrics[w]])
        rows.append([w, f"{ips:.0f}", f"{step_ips:.0f}", f"{ips / step_ips:.2f}", f"{wait:.2f}",
                     spread([m["images_per_second"] for m in metrics[w]])])
    header = (f"## Epoch: {method}, Fashion-MNIST subset of {args.subset} images ({steps} steps of {args.batch}), "
              f"{rounds} interleaved rounds\n")
    return header + "\n" + markdown_table(
        ["loader_workers", "train_epoch images/s", "step-only images/s", "epoch/step-only", "data_wait_fraction",
         "spread epoch"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller subset")
    parser.add_argument("--backbone", default="resnet_small", choices=["resnet_small", "resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=256, help="batch size (images; each has two views)")
    parser.add_argument("--image-size", type=int, default=28, help="step part: side of the random images")
    parser.add_argument("--channels", type=int, default=1, help="step part: channels of the random images")
    parser.add_argument("--queue", type=int, default=4096, help="MoCo queue length K")
    parser.add_argument("--rounds", type=int, default=15, help="step part: timed rounds (quick: 3)")
    parser.add_argument("--subset", type=int, default=1024, help="epoch part: pretraining images (quick: 512)")
    parser.add_argument("--epoch-rounds", type=int, default=3, help="epoch part: timed epochs each (quick: 2)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1], help="epoch part: values to try")
    parser.add_argument("--epoch-methods", nargs="*", default=["simclr"], choices=["simclr", "moco"],
                        help="epoch part: methods (none skips the part)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc defaults (trainers call trainers.runtime.keep_freed_memory)")
    args = parser.parse_args(argv)
    malloc = "glibc defaults" if args.system_malloc or not keep_freed_memory() else "keep_freed_memory()"
    if args.quick:
        args.rounds, args.subset, args.epoch_rounds = 3, 512, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.subset < args.batch:
        parser.error(f"--subset ({args.subset}) must hold at least one batch ({args.batch})")

    print(f"# bench_step ({machine_note()}; malloc: {malloc})\n")
    print(step_part(args), flush=True)
    print("step part done", file=sys.stderr, flush=True)
    for method in args.epoch_methods:
        print("\n" + epoch_part(args, method), flush=True)
    print(f"\nFinished with {machine_note().split('; ')[-1]}.")


if __name__ == "__main__":
    main()
