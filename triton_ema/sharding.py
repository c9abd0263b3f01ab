"""DTensor (FSDP2) parameters: the EMA of each rank's local shard.

The buckets only ever see plain local tensors; this module turns a DTensor
parameter into its local shard and a local shadow back into a DTensor with
the parameter's mesh and placements (no copy, no communication), for
checkpoints that ``torch.distributed.checkpoint`` can reshard.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeGuard

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _dtensor_type() -> Any:
    """DTensor, if anything imported it (no DTensor can exist otherwise): importing it takes half a second."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """The tensor a bucket tracks: a DTensor's local shard object, or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def like(shard: Tensor, param: Tensor) -> Tensor:
    """``shard`` (shaped like ``param``'s local shard) as a tensor shaped like ``param``."""
    if not is_dtensor(param):
        return shard
    return _dtensor_type().from_local(shard, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())


def local_value(value: Tensor, param: Tensor) -> Tensor:
    """A saved value for ``param`` as this rank's shard of it: a DTensor is
    redistributed to ``param``'s placements; a full tensor is scattered
    (a collective: every rank loads together)."""
    if not is_dtensor(param):
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        if value.device_mesh != param.device_mesh or value.placements != param.placements:
            value = value.redistribute(param.device_mesh, param.placements)
        return value.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements).to_local()


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call)."""
    return t.full_tensor() if is_dtensor(t) else t


def reshard(module: nn.Module | None) -> None:
    """Free the gathered parameters of every FSDP2 module in ``module`` (FSDP2 keeps the root's
    gathered after a forward): its parameters are the shards again, and the next forward gathers them."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None or module is None:
        return
    for m in module.modules():
        if isinstance(m, fsdp_module):
            m.reshard()
