"""What an EMA averages: the wrapped optimizer's params, then the model's floating
buffers when asked, followed when the user's side replaces them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .arguments import check_params, find_buffers, param_names
from .sharding import is_dtensor, local

if TYPE_CHECKING:
    from .store import ShadowStore


class Tracking:
    """The averaged tensors as the user holds them (``objects``: params, then buffers)
    and as the buckets see them (local shards of DTensors); index ``i`` is the store's."""

    def __init__(self, model: nn.Module | None, update_buffers: bool) -> None:
        self.model = model
        self.buffer_slots: list[tuple[nn.Module, str, str]] = []  # (module, attribute, name)
        if update_buffers:
            assert model is not None, "update_buffers without model= is refused by the argument check"
            self.buffer_slots = find_buffers(model)
        self.objects: list[Tensor] = []
        self.num_params = 0
        self.shards: list[int] = []  # DTensor params: FSDP2 may put another local shard object in place

    def track(self, param_groups: list[dict]) -> tuple[list[Tensor], list[str]]:
        """Take the optimizer's params as they are now: the tensors the buckets average, and their names."""
        params = [p for group in param_groups for p in group["params"]]
        names = param_names(param_groups, self.model)
        check_params(params, names)
        self.objects = params + [module._buffers[attr] for module, attr, _ in self.buffer_slots]
        self.num_params = len(params)
        self.shards = [i for i, t in enumerate(params) if is_dtensor(t)]
        return [local(t) for t in self.objects], names + self.buffer_names

    def positions(self) -> dict[int, int]:
        """Each averaged tensor's index, by ``id()`` of the object the model holds now: buffers
        that ``module.to()`` replaced are taken first (their EMA stays where it is in the store)."""
        self._take_buffers(strict=False)
        return {id(t): i for i, t in enumerate(self.objects)}

    @property
    def buffer_names(self) -> list[str]:
        return [name for _, _, name in self.buffer_slots]

    def params_changed(self, param_groups: list[dict]) -> bool:
        """Params were added to (or removed from) the optimizer since :meth:`track`."""
        return sum(len(group["params"]) for group in param_groups) != self.num_params

    def _take_buffers(self, *, strict: bool) -> None:
        """Buffers as the model holds them now (``module.to()`` replaces them)."""
        n = self.num_params
        for j, (module, attr, name) in enumerate(self.buffer_slots):
            buf = module._buffers.get(attr)
            if buf is not None:
                self.objects[n + j] = buf
            elif strict:
                raise RuntimeError(f"buffer {name} was removed from the model; its EMA cannot follow")

    def follow(self, store: ShadowStore) -> None:
        """Give ``store`` the buffers that ``module.to()`` replaced and the shards that moved,
        then let it notice storage that moved."""
        self._take_buffers(strict=True)
        objects, tracked = self.objects, store.tensors
        for i in self.shards:
            shard = local(objects[i])
            if shard is not tracked[i]:
                store.replace(i, shard)
        for i in range(self.num_params, len(objects)):
            if objects[i] is not tracked[i]:
                store.replace(i, local(objects[i]))
        store.refresh()

    def current(self) -> list[Tensor]:
        """The averaged tensors as the model holds them now, as the buckets see them."""
        self._take_buffers(strict=False)
        return [local(t) for t in self.objects]

    def put_back(self, moved: dict[int, Tensor], store: ShadowStore) -> None:
        """After a swap: the training weights in ``moved[i]`` (the storage tensor ``i`` had
        when the swap began) go into the model: into the tensor's new storage, or, where
        its shape changed, the old storage is put back in the model. The next step or
        swap lays the shadows out for the new layout."""
        n = self.num_params
        for i, old in moved.items():
            current = local(self.objects[i])
            if current.shape == old.shape:
                current.detach().copy_(old)
            elif i < n:
                self.objects[i].data = old
            else:
                module, attr, _ = self.buffer_slots[i - n]
                module._buffers[attr] = self.objects[i] = old
                store.replace(i, old)
