"""Data-parallel training under torchrun: rank detection, process group set-up, config agreement, sharding.

torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT or a
rendezvous endpoint). Without those variables everything here degrades to a single process of world size 1,
so the training loop has one code path. NCCL serves CUDA ranks, gloo CPU ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fpdm.errors import FpdmRuntimeError, UsageError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: `rank` of `world_size` processes, `device` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this context created the process group and must destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.initialized_here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun): for printing before training starts."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def under_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer (set by torchrun)") from None


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank owns cuda:LOCAL_RANK; a fixed cuda:N would put every rank of a node on the same card."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise UsageError(
            f"train.device={str(device)!r} under torchrun: each rank uses cuda:LOCAL_RANK, "
            "set train.device to auto or cuda"
        )
    if local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA devices; "
            "lower --nproc_per_node"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def distributed(device: torch.device, *, timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join torchrun's process group for the duration of the block (NCCL on CUDA, gloo on CPU) and leave it
    on the way out, errors included. Outside torchrun, or when the caller already initialised a group (which
    it then owns), nothing is created or destroyed."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, _rank_device(device, local), False)
        return
    if not under_torchrun():
        yield DistContext(0, 1, 0, device, False)
        return
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    device = _rank_device(device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL init, so its communicator binds to this rank's card
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield DistContext(rank, world, local, device, True)
    finally:
        dist.destroy_process_group()


def config_digest(config: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()


def check_same_config(ctx: DistContext, config: dict[str, Any]) -> None:
    """Every rank must train the same config (a rank with a different --set would silently train something
    else). All ranks gather every digest, so all of them fail together with the same one line."""
    if not ctx.enabled:
        return
    digests = _gather_bytes(ctx, config_digest(config))
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise UsageError(
            f"the config differs across ranks (rank {differ[0]} vs rank 0; compare their --config and "
            "--set): every rank must be launched with the same arguments"
        )


def check_in_sync(ctx: DistContext, *modules: nn.Module) -> None:
    """Cheap end-of-run guard that data parallelism kept every replica bit-identical."""
    if not ctx.enabled:
        return
    digest = hashlib.sha256()
    for module in modules:
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = _gather_bytes(ctx, digest.digest())
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise FpdmRuntimeError(f"replicas diverged: rank {differ[0]} holds different weights than rank 0")


def _gather_bytes(ctx: DistContext, payload: bytes) -> list[bytes]:
    # A fixed-size tensor collective on the rank's own device: NCCL only moves CUDA tensors.
    mine = torch.tensor(list(payload), dtype=torch.uint8, device=ctx.device)  # (32,)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()) for t in out]


def mean_across_ranks(ctx: DistContext, values: Tensor) -> Tensor:
    """Mean of a small tensor over ranks, identical on every rank (gloo has no AVG reduction: sum, divide)."""
    if not ctx.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def shard(ctx: DistContext, global_batch: int, *, grad_accum: int = 1) -> slice:
    """This rank's contiguous slice of a global batch; ranks take equal shares so the mean of their mean
    losses (what DDP's gradient averaging computes) is the global batch's mean loss. The share must split
    further into `grad_accum` equal micro-batches, for the same reason."""
    if global_batch % ctx.world_size:
        raise UsageError(
            f"train.batch_size={global_batch} is the global batch and must divide by the world size {ctx.world_size}"
        )
    per = global_batch // ctx.world_size
    if per % grad_accum:
        raise UsageError(
            f"train.batch_size={global_batch} over {ctx.world_size} ranks gives {per} samples per rank, which do "
            f"not split into train.grad_accum={grad_accum} equal micro-batches"
        )
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def micro_batches(size: int, grad_accum: int) -> list[slice]:
    """`grad_accum` equal, contiguous slices of a rank's `size` samples (`shard` checked that they divide)."""
    per = size // grad_accum
    return [slice(m * per, (m + 1) * per) for m in range(grad_accum)]


def gradient_sync(net: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: DDP all-reduces gradients only when `sync` (the optimizer
    step's last micro-batch); the others accumulate locally under `no_sync`. A plain module: nothing to do."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(net, DistributedDataParallel):
        return contextlib.nullcontext()
    return net.no_sync()


def wrap_model(ctx: DistContext, model: nn.Module, *, find_unused: bool) -> nn.Module:
    """DDP around `model` when data-parallel (it broadcasts rank 0's weights at construction); else `model`."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
