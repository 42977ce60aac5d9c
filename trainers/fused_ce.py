"""The fused C++ kernel of the two common contrastive losses, built on first use, with the eager path as fallback.

``csrc/fused_ce.cpp`` computes one process's SimCLR loss and MoCo's InfoNCE (unit queue, no gradient into it) as
:func:`trainers.streamed_ce.contrastive_cross_entropy` does, each with its own autograd node. Each thread takes one
run of rows (sized by the threads' measured speeds, so that a core running slower on a shared host gets fewer) and
does all of their work, in one parallel region (with up to four threads each SimCLR thread normalises every row into
its own copy of the unit rows, so no thread's products read rows another core wrote): single-threaded products tile
by tile (one thread's tile budget), each tile exponentiated and summed in that core's cache by vectorised row loops
(AVX-512, AVX2 or baseline builds of the same loops, picked at run time), then its own rows of E scaled and
multiplied for the gradient. The gradient is made in the forward (a loss is a scalar: the backward only scales it
where the upstream gradient is not 1), so E is freed before the forward returns and the loss keeps only gradients
the size of its inputs until the backward. At small sizes that removes most of the eager path's cost beyond the
products (about 35 small Python-level ops and a Python autograd Function); ``benchmarks/bench_loss.py`` times both
against the products alone. Two differences in arithmetic: SimCLR's gradient here is ``(W E + E W) @ a`` (E scaled
in place, one product of D columns), where the eager path makes one product ``E @ [a | W a]`` of 2D columns; and the
exp is the kernel's own, within 1.5 ulp (ATen's: 1). The two paths agree to float rounding (tests/test_fused_ce.py
compares them).

The kernel is compiled with the machine's C++ compiler through ``torch.utils.cpp_extension`` (about 30 s, once;
the build is cached under ``~/.cache/torch_extensions`` and reused by every later process, Ray workers included;
``scripts/setup.sh`` builds it). Where it cannot be built (no compiler, no Python headers), a warning says why
once and the losses take the eager path, which gives the same values. Set ``CONTRASTIVE_STUDY_FUSED_LOSS=0`` to
never use it; :func:`eager_only` turns it off within a block (tests and benchmarks compare the two).

Run ``python -m trainers.fused_ce`` to build it and print whether it loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from trainers import streamed_ce

SOURCE = Path(__file__).parent / "csrc" / "fused_ce.cpp"
ENV_VAR = "CONTRASTIVE_STUDY_FUSED_LOSS"
BUILD_NAME = "contrastive_study_fused_ce"
# -fopenmp: at::parallel_for runs in parallel only when the including file is compiled with OpenMP (it then uses
# the libgomp that torch has already loaded; nothing extra is linked). -fno-trapping-math lets GCC turn the exp's
# clamp into min/max, without which its AVX2 and baseline loops stayed scalar (6x and 10x slower); -fno-math-errno
# inlines sqrt; -ffp-contract=fast lets a * b + c become one fused multiply-add. None of them allows reordering sums.
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast"]

_eager_only = False


@cache
def load() -> ModuleType | None:
    """The compiled kernel (built the first time, then loaded from the cache), or ``None`` with a warning."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    # torch runs `ninja` from PATH; pip puts it beside this interpreter, which need not be on PATH.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" (at import): irrelevant to a CPU kernel
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name=BUILD_NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as error:  # any build or load failure: the eager path gives the same values
        warnings.warn(f"fused contrastive loss unavailable, using the eager path: {error}", stacklevel=2)
        return None
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def eager_only() -> Iterator[None]:
    """Within the block, the losses take the eager path even where the fused kernel is available."""
    global _eager_only
    previous, _eager_only = _eager_only, True
    try:
        yield
    finally:
        _eager_only = previous


def _usable(tensors: tuple[Tensor, ...], beta: float) -> tuple[ModuleType, torch.dtype] | None:
    """The kernel and the dtype to compute in, where the fused path applies: CPU tensors, a gradient to compute
    (the kernel's forward always makes it; without one the eager path computes the loss alone, storing no logits)
    and unshifted logits (see streamed_ce._exp_logits).
    Plain loops, no generators: this runs on every call (0.7 us instead of 2.2)."""
    if _eager_only or not torch.is_grad_enabled():
        return None
    requires_grad = False
    for t in tensors:
        if not t.is_cpu:
            return None
        requires_grad = requires_grad or t.requires_grad
    if not requires_grad:
        return None
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    limit = streamed_ce._SAFE_UNSHIFTED.get(dtype)
    if limit is None or beta > limit:
        return None
    module = load()
    return None if module is None else (module, dtype)


def simclr_tile_rows(views_rows: int, dtype: torch.dtype) -> int:
    """Rows per tile of the SimCLR kernel for ``views_rows`` rows per view: one thread's budget (each thread makes
    its own tiles) of rows of ``2 * views_rows`` logits."""
    return streamed_ce.cpu_tile_rows(2 * views_rows, dtype.itemsize, one_thread=True)


def keyed_tiles(candidates: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(tile_rows, block_columns)`` of the MoCo kernel against ``candidates`` columns: tiles of column blocks, as
    on the eager path (a long queue in whole rows would leave too few rows per tile), one thread's budget each."""
    return streamed_ce.cpu_block_tiles(candidates, dtype.itemsize, one_thread=True)


def simclr_loss(z1: Tensor, z2: Tensor, beta: float) -> Tensor | None:
    """One process's SimCLR loss (see :func:`trainers.losses.nt_xent`), or ``None`` where the fused path does
    not apply (the caller then takes the eager path)."""
    usable = _usable((z1, z2), beta)
    if usable is None:
        return None
    module, dtype = usable  # the kernel converts to dtype and makes the inputs contiguous
    return module.simclr_loss(z1, z2, beta, simclr_tile_rows(z1.shape[0], dtype))


def keyed_loss(queries: Tensor, keys: Tensor, unit_candidates: Tensor, beta: float) -> Tensor | None:
    """MoCo's InfoNCE against unit-norm candidates that get no gradient (see :func:`trainers.losses.info_nce`),
    or ``None`` where the fused path does not apply."""
    if unit_candidates.requires_grad and torch.is_grad_enabled():
        return None
    usable = _usable((queries, keys), beta)
    if usable is None:
        return None
    module, dtype = usable  # the kernel converts to dtype and makes the inputs contiguous
    return module.keyed_loss(queries, keys, unit_candidates, beta, *keyed_tiles(unit_candidates.shape[0], dtype))


def main() -> int:
    start = time.perf_counter()
    module = load()
    if module is None:
        print(f"fused contrastive loss: not available ({ENV_VAR}={os.environ.get(ENV_VAR, 'unset')}; "
              "see the warning above); the losses use the eager path")
        return 0
    print(f"fused contrastive loss: ready in {time.perf_counter() - start:.1f} s (built on first use, then "
          f"cached: {module.__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
