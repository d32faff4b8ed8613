"""Data-parallel training on CPUs (``accelerate launch``): the pieces fastai needs around it.

fastai's ``DistributedTrainer`` (``learn.distrib_ctx``) wraps every fit of a recipe. On CPU
the process group is gloo, which needs two adjustments, both scoped to the run that needs
them (nothing in fastai is changed for the rest of the process):

- ``DistributedDL._broadcast`` moves the shuffled index tensor to CUDA because NCCL needs it;
  gloo needs it on the CPU (``parallel`` swaps in a CPU version for the duration of the block);
- a range test stops at a divergence that ranks would reach at different steps, so rank 0
  runs it alone on the unwrapped model and broadcasts the result (``on_rank0``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from fastai.torch_core import num_distrib, rank_distrib

T = TypeVar("T")


def _gloo_broadcast(self: Any, t: Any, rank: int) -> list[int]:
    """fastai's ``DistributedDL._broadcast`` with the tensor kept on the CPU unless the backend is NCCL."""
    t = torch.LongTensor(t)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


@contextlib.contextmanager
def parallel(learn: Any) -> Iterator[None]:
    """fastai's data-parallel context when the run was launched on several processes (gloo on
    CPU, no SyncBatchNorm: it needs CUDA); a no-op in a single process."""
    if num_distrib() <= 1:
        yield
        return
    from fastai.distributed import DistributedDL

    cuda = torch.cuda.is_available()
    original = DistributedDL._broadcast
    if not cuda:
        DistributedDL._broadcast = _gloo_broadcast
    try:
        with learn.distrib_ctx(sync_bn=cuda, cpu=not cuda):
            yield
    finally:
        DistributedDL._broadcast = original


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """fastai reads WORLD_SIZE to decide whether to sync (lr_find's save/load call a barrier):
    while rank 0 works alone, it must see a world of one."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def on_rank0(learn: Any, work: Callable[[], T]) -> T:
    """``work()`` on rank 0 alone (its unwrapped model, a world of one), its result broadcast to
    every rank; in a single process simply ``work()``. The next fit re-syncs the weights from
    rank 0 when DDP wraps the model again."""
    if num_distrib() <= 1:
        return work()
    result: list[Any] = [None]
    if rank_distrib() == 0:
        with learn.removed_cbs(learn.distributed_trainer), single_process():
            result = [work()]
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]
