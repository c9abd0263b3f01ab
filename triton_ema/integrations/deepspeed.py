"""DeepSpeed: an EMA of each rank's fp32 master weights, kept inside ``engine.step()``.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ema = attach(engine, momentum=1e-3)
    loss = loss_fn(engine(batch)); engine.backward(loss); engine.step()   # the EMA updates inside the step
    with ema.swap_ema(): evaluate(engine)                                 # the module computes with the EMA
    engine.save_checkpoint(save_dir); engine.load_checkpoint(save_dir)   # the EMA rides in the optimizer states
    full = ema.ema_state_dict(full=True)                                  # model-keyed full EMA (a collective)

Under ZeRO 1-3 (and DeepSpeed's bf16/fp16 optimizers) the engine's optimizer
wraps a torch optimizer whose parameters are the fp32 master weights of this
rank: flat partitions, or per-parameter copies at stage 0. The EMA is of
those tensors, in float32, with no collective in the step and no full copy.
It is a front end over the EMA core (:class:`triton_ema.ema.EMA` of the
master tensors), driven by that torch optimizer's own hooks: it updates once
all master tensors have taken their step (a step DeepSpeed skips for a
non-finite gradient never steps them: nothing updates, nothing is counted),
and it rides in that optimizer's ``state_dict()``, which DeepSpeed writes to
each rank's optimizer-states file and loads back. The engine's ``step``,
``save_checkpoint`` and ``load_checkpoint`` are wrapped on the instance, to
refuse them inside ``swap_ema()`` and to restart the EMA from the loaded
weights when a load does not bring the optimizer states.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import Tensor

from ..checkpoint import Checked, check_ema, ema_state
from ..deepspeed_checkpoint import LAYOUT_FORMAT, assemble, layout_mismatch, local_pieces, rank_ema
from ..ema import EMA, Update
from ..frontend import EMAFrontEnd
from ..schedules import Schedule
from ..swap import SwapContext

__all__ = ["attach", "attached", "DeepSpeedEMA"]

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its DeepSpeedEMA


def attach(engine: Any, momentum: float | Schedule | Mapping[str, float | Schedule] | None = None, **kwargs: Any) -> DeepSpeedEMA:
    """Keep an EMA of the fp32 master weights of ``engine`` (from ``deepspeed.initialize``).

    Takes :class:`~triton_ema.EMAOptimizer`'s arguments (``momentum`` or
    ``decay``, ``interval``, ``shadow_dtype``, ``device``, ``backend``, ...);
    the model is the engine's module. The EMA is of the fp32 master weights
    this rank owns, in float32, with no collective in the step.

    Args:
        engine: The engine ``deepspeed.initialize`` returns (ZeRO 0-3, fp32,
            bf16, ``BF16_Optimizer``; no offloading).
        momentum: As for :class:`~triton_ema.EMAOptimizer`.
        **kwargs: :class:`~triton_ema.EMAOptimizer`'s other arguments; not
            ``model`` or ``update_buffers``.

    Returns:
        The :class:`DeepSpeedEMA`.

    Raises:
        TypeError: ``engine`` is not a ``DeepSpeedEngine``.
        RuntimeError: An EMA is already attached to this engine.
        ValueError: ``model=`` or ``update_buffers=`` given; an engine without
            an optimizer, with offloading, or with DeepSpeed's fused fp16
            optimizer.
    """
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        raise TypeError(f"attach() takes the engine that deepspeed.initialize() returns, got {type(engine).__name__}: "
                        "call deepspeed.initialize(model=..., optimizer=...) first and attach to its engine")
    if engine in _ATTACHED:
        raise RuntimeError("an EMA is already attached to this engine; use the one attach() returned")
    for key in ("model", "update_buffers"):
        if kwargs.get(key):
            raise ValueError(f"{key}= is not taken under DeepSpeed: the EMA is of the engine's module parameters "
                             "(its fp32 master weights); buffers are not averaged")
    ema = DeepSpeedEMA(engine, momentum, kwargs)
    _ATTACHED[engine] = ema
    return ema


def attached(engine: Any) -> DeepSpeedEMA | None:
    """The EMA that :func:`attach` attached to ``engine``, or None.

    Args:
        engine: A ``DeepSpeedEngine``.
    """
    return _ATTACHED.get(engine)


class DeepSpeedEMA(EMAFrontEnd):
    """The EMA of one engine's master weights: ``swap_ema()``, ``ema_state_dict(full=)``, ``num_steps``.

    Made by :func:`attach`, not directly. The EMA rides in the state dict of
    DeepSpeed's torch optimizer (``"ema"`` and ``"ema_layout"``), so
    ``engine.save_checkpoint`` / ``load_checkpoint`` carry it.

    Args:
        engine: The engine.
        momentum: As for :class:`~triton_ema.EMAOptimizer`.
        kwargs: :class:`~triton_ema.EMAOptimizer`'s other arguments, a dict.

    Attributes:
        engine: The engine.
        core: The EMA of this rank's master tensors.
        layout: Where each parameter lies in the ranks' master tensors.
    """

    def __init__(self, engine: Any, momentum: Any, kwargs: dict[str, Any]) -> None:
        outer = engine.optimizer
        if outer is None or type(outer).__name__ == "DummyOptim":
            raise ValueError("this engine has no optimizer (deepspeed.initialize without optimizer= or an "
                             "'optimizer' config entry): there are no master weights to average")
        for what in ("offload_optimizer", "offload_param"):
            device = getattr(getattr(engine, f"zero_{what}")(), "device", None)
            device = getattr(device, "value", device)
            if device not in (None, "none"):
                raise ValueError(f"zero_optimization.{what} (device {device!r}) is not supported by "
                                 "the EMA: train without offloading, or keep the EMA with triton_ema.attach on a "
                                 "plain torch setup")
        self.engine = engine
        self.kind, self.inner, masters = _masters(engine)
        self._masters = masters
        self._master_ids = {id(t) for t in masters}
        self.core = EMA([{"params": masters}], momentum, **kwargs)
        self.layout = self._layout(masters)
        self._stepped: set[int] = set()  # the masters stepped so far in this engine step
        self._update: Update | None = None  # this engine step's EMA update, taken before its first master changed
        self._loaded: str | None = None  # during load_checkpoint: "ema" or "bare" once the torch optimizer loaded
        self._pending: Checked | None = None  # between the load hooks: the checked "ema" entry
        self._handles = [self.inner.register_step_pre_hook(self._before_step),
                         self.inner.register_step_post_hook(self._after_step),
                         self.inner.register_state_dict_post_hook(self._add_state),
                         self.inner.register_load_state_dict_pre_hook(self._check_load),
                         self.inner.register_load_state_dict_post_hook(self._load)]
        self._wrap("step", self._engine_step)
        self._wrap("save_checkpoint", self._engine_save)
        self._wrap("load_checkpoint", self._engine_load)

    # --- what the user calls ------------------------------------------------

    @property
    def world_size(self) -> int:
        """The data-parallel world size the layout was made for."""
        return int(self.layout["world_size"])

    def swap_ema(self, name: str | None = None) -> SwapContext:
        """``with ema.swap_ema():`` the engine's module computes with the EMA; on exit, also by an
        exception, the training weights are back, bitwise.

        A collective under ZeRO (every rank enters it): the 16-bit weights are refreshed from
        the swapped masters the way DeepSpeed refreshes them after a step.

        Args:
            name: The profile; required with several.

        Raises:
            RuntimeError: Nested; ``engine.step()`` or ``engine.save_checkpoint()`` inside it.
        """
        return SwapContext(self.core, self.core.profile(name), self, after=self._refresh)

    def ema_state_dict(self, name: str | None = None, *, full: bool = False) -> dict[str, Tensor]:
        """The EMA (float32, of profile ``name``) keyed like the engine's module parameters.

        ``full=True``: every parameter whole (under ZeRO a collective: every rank calls it, each
        gets the whole dict). ``full=False``: this rank's part only, each a 1-d piece of the
        flattened parameter (ZeRO 1/2: the elements of the parameter in this rank's partition,
        parameters outside it absent; ZeRO-3: this rank's shard, padded as DeepSpeed pads it);
        at stage 0 every parameter whole.

        Args:
            name: The profile; required with several.
            full: Gather every parameter whole (a collective under ZeRO).

        Returns:
            A dict keyed like the engine's module parameters.
        """
        shadows = self.shadows(name)
        if self.kind == "whole":
            return assemble(self.layout, [shadows])
        if full:
            return assemble(self.layout, _all_gather(shadows, self.world_size, self.engine.optimizer.dp_process_group))
        return local_pieces(self.layout, shadows, dist.get_rank(group=self.engine.optimizer.dp_process_group))

    def load_checkpoint_ema(self, folder: str, tag: str | None = None) -> None:
        """This rank's EMA (and step count) from a checkpoint, without the engine's weights or optimizer states.

        Args:
            folder: What ``engine.save_checkpoint(folder, tag)`` wrote to.
            tag: The checkpoint's tag; default the one in ``folder/latest``.

        Raises:
            RuntimeError: Inside ``swap_ema()``.
            FileNotFoundError: No file of this rank, or no such tag.
            ValueError: A file without the EMA, or of another layout (model, ZeRO stage, world size).
        """
        self.core.refuse_while_swapped("load_checkpoint_ema()")
        rank = 0 if self.kind == "whole" else dist.get_rank(group=self.engine.optimizer.dp_process_group)
        ema, layout = rank_ema(folder, tag, rank)
        self._check_load(self.inner, {"ema": ema, "ema_layout": layout})
        self._load(self.inner)

    @torch.no_grad()
    def load_into_model(self, name: str | None = None) -> None:
        """The EMA becomes the training weights: copied into this rank's master weights, and what the
        module computes with refreshed from them (a collective under ZeRO: every rank calls it).

        The EMA itself is unchanged; further steps train from the EMA weights.

        Args:
            name: The profile; required with several.

        Raises:
            RuntimeError: Inside ``swap_ema()``.
        """
        self.core.refuse_while_swapped("load_into_model()")
        for master, shadow in zip(self._masters, self.shadows(name)):
            master.copy_(shadow)
        self._refresh()

    def shadows(self, name: str | None = None) -> list[Tensor]:
        """This rank's EMA of each master tensor, in the order of the masters (copies).

        Args:
            name: The profile; required with several.

        Raises:
            ValueError: A missing or unknown profile name.
        """
        core, profile = self.core, self.core.profile(name)
        core.adopt_new_params()  # and waits for an update in flight
        return [core.store.ema(i, profile).detach().clone() for i in range(len(core.names))]

    # Model-keyed EMA modules and loads, and DCP, need the module's parameters averaged, not the masters.
    def ema_module(self, name: str | None = None) -> Any:
        raise _unsupported("ema_module()")

    def load_ema_state_dict(self, state_dict: dict[str, Tensor], *, num_steps: int) -> None:
        raise _unsupported("load_ema_state_dict()")

    @property
    def ema_checkpoint(self) -> Any:
        raise _unsupported("ema_checkpoint")

    def detach(self) -> None:
        """Remove the hooks and the engine's wrapped methods: the engine trains and saves without the EMA."""
        self.core.refuse_while_swapped("detach()")
        for handle in self._handles:
            handle.remove()
        for method in ("step", "save_checkpoint", "load_checkpoint"):
            self.engine.__dict__.pop(method, None)
        _ATTACHED.pop(self.engine, None)

    # --- the engine's methods, wrapped on the instance ------------------------

    def _wrap(self, method: str, wrapper: Any) -> None:
        original = getattr(self.engine, method)
        setattr(self.engine, method, functools.wraps(original)(functools.partial(wrapper, original)))

    def _engine_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        self.core.refuse_while_swapped("engine.step()")
        return original(*args, **kwargs)

    def _engine_save(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        self.core.refuse_while_swapped("engine.save_checkpoint()")
        return original(*args, **kwargs)

    def _engine_load(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        self.core.refuse_while_swapped("engine.load_checkpoint()")
        if self.engine.load_universal_checkpoint():
            raise ValueError("DeepSpeed's universal checkpoints do not carry the EMA (its conversion knows only "
                             "the optimizer's own states): resume the EMA on the number of ranks it was saved with, "
                             "or export it with triton_ema.deepspeed_checkpoint.read_deepspeed_ema")
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.apply_defaults()
        self._loaded = None
        result = original(*args, **kwargs)
        if result[0] is None or self._loaded == "ema":  # nothing found to load, or the EMA came back with the optimizer
            return result
        if self._loaded == "bare":
            why = "the checkpoint's optimizer states hold no EMA (saved before it was attached?)"
        elif bound.arguments["load_module_only"] or not bound.arguments["load_optimizer_states"]:
            flag = "load_module_only=True" if bound.arguments["load_module_only"] else "load_optimizer_states=False"
            why = f"load_checkpoint({flag}) loads no optimizer states, so no EMA"
        else:
            why = None
        if why is not None:
            self.core.restart()
            warnings.warn(f"{why}: the EMA restarts from the loaded weights (step count {self.num_steps})",
                          UserWarning, stacklevel=3)
            return result
        raise RuntimeError(f"DeepSpeed loaded {result[0]!r} without the optimizer's state dict (an elastic "
                           "checkpoint, or another number of ranks): the EMA was not restored and keeps its values "
                           "from before the load")

    # --- the torch optimizer's hooks -------------------------------------------

    def _stepping(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """The master tensors this call of the optimizer's step updates (ZeRO steps them one group at a time)."""
        return {id(p) for group in optimizer.param_groups for p in group["params"]} & self._master_ids

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The engine's step() is refused inside a swap first; the core refuses a direct call of its optimizer's step.
        if not self._stepped:  # the first call of this engine step: the core's checks, before any master changes
            self._update = self.core.before_step()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        stepping = self._stepping(optimizer)
        if stepping & self._stepped:
            raise RuntimeError("the engine's optimizer stepped a master tensor twice before stepping all of them: "
                               "the EMA cannot tell its steps apart")
        self._stepped |= stepping
        if self._stepped == self._master_ids:  # the masters are stepped: one EMA update, one step counted
            update, self._stepped, self._update = self._update, set(), None
            self.core.after_step(update)

    def _add_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["ema"] = ema_state(self.core)
        state_dict["ema_layout"] = dict(self.layout, rank=0 if self.kind == "whole" else dist.get_rank())
        return state_dict

    def _check_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Before the torch optimizer loads anything: the layout is checked here, the EMA loaded after it.
        self.core.refuse_while_swapped("loading the optimizer state")
        self._pending = None
        if "ema" in state_dict:
            saved = state_dict.get("ema_layout", {})
            ours = {k: v for k, v in self.layout.items()}
            for key in ("kind", "world_size", "names", "shapes", "masters", "offsets", "numels"):
                if saved.get(key) != ours[key]:
                    raise ValueError(layout_mismatch(key, saved.get(key), ours[key]))
            self._pending = check_ema(self.core, state_dict["ema"])
        return {k: v for k, v in state_dict.items() if k not in ("ema", "ema_layout")}

    def _load(self, optimizer: torch.optim.Optimizer) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            self._loaded = "bare"  # saved without the EMA: load_checkpoint restarts it once the weights are loaded
            return
        self.core.load(*pending)
        self._loaded = "ema"

    # --- where the parameters lie in the masters, and the 16-bit refresh ----------

    def _layout(self, masters: list[Tensor]) -> dict[str, Any]:
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        opt, entries = self.engine.optimizer, []  # (param, master index, offset)
        if self.kind == "whole":
            params = [p for group in getattr(opt, "fp16_groups", [g["params"] for g in self.inner.param_groups])
                      for p in group]
            entries = [(p, i, 0) for i, p in enumerate(params)]
            shapes = [tuple(p.shape) for p in params]
        elif isinstance(opt, DeepSpeedZeroOptimizer):
            for i, (group, offsets) in enumerate(zip(opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets)):
                entries += [(p, i, off) for p, off in zip(group, offsets)]
            shapes = [tuple(p.shape) for p, _, _ in entries]
        elif isinstance(opt, BF16_Optimizer):
            for i, group in enumerate(opt.bf16_groups):
                offsets = [0, *torch.tensor([p.numel() for p in group]).cumsum(0).tolist()]
                entries += [(p, i, off) for p, off in zip(group, offsets)]
            shapes = [tuple(p.shape) for p, _, _ in entries]
        else:  # ZeRO-3: each parameter's shard, in order, in its sub group's flat partition
            for i, group in enumerate(opt.fp16_groups):
                offset = 0
                for p in group:
                    entries.append((p, i, offset))
                    offset += p.ds_tensor.ds_numel
            shapes = [tuple(p.ds_shape) for p, _, _ in entries]
        world = 1 if self.kind == "whole" else dist.get_world_size(group=self.engine.optimizer.dp_process_group)
        return {"format": LAYOUT_FORMAT, "kind": self.kind, "world_size": world,
                "names": [names[id(p)] for p, _, _ in entries], "shapes": [list(s) for s in shapes],
                "masters": [i for _, i, _ in entries], "offsets": [int(off) for _, _, off in entries],
                "numels": [t.numel() for t in masters]}

    @torch.no_grad()
    def _refresh(self) -> None:
        """What the module computes with, from the master weights, as DeepSpeed does after a step."""
        opt = self.engine.optimizer
        if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            opt.update_lp_params()  # this rank's 16-bit partition from its masters, then the all-gather
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            opt.checkpoint_event_prologue()  # every parameter back to its partition
            for flat16, flat32, params in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat,
                                              opt.fp16_partitioned_groups):
                flat16.copy_(flat32)
                for p, q in zip(params, opt.unflatten(flat16, params)):
                    p.data = q.data
            opt.checkpoint_event_epilogue()  # the persistent (never partitioned) parameters gathered again
        elif isinstance(opt, FP16_UnfusedOptimizer):
            for group16, group32 in zip(opt.fp16_groups, opt.fp32_groups):
                for p16, p32 in zip(group16, group32):
                    p16.copy_(p32)
        # A bare torch optimizer (fp32, stage 0): the masters are the module's parameters.


def _masters(engine: Any) -> tuple[str, torch.optim.Optimizer, list[Tensor]]:
    """(layout kind, the torch optimizer that steps the masters, the masters) of ``engine``."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return "whole", opt, [p for group in opt.param_groups for p in group["params"]]
    if isinstance(opt, FP16_UnfusedOptimizer):
        return "whole", opt.optimizer, [p for group in opt.fp32_groups for p in group]
    if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        return "flat", opt.optimizer, [p for group in opt.optimizer.param_groups for p in group["params"]]
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        if any(flat is None for flat in opt.fp16_partitioned_groups_flat):
            raise ValueError("ZeRO-3 with parameters swapped to NVMe is not supported by the EMA")
        return "sharded", opt.optimizer, list(opt.fp32_partitioned_groups_flat)
    if isinstance(opt, FP16_Optimizer):
        raise ValueError("DeepSpeed's fused fp16 optimizer (stage 0 with FusedAdam) is not supported by the EMA: "
                         "give deepspeed.initialize a torch optimizer, or use ZeRO stage 1-3")
    raise ValueError(f"the engine's optimizer is a {type(opt).__name__}, which the EMA does not support (supported: "
                     "a torch optimizer at stage 0, FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO stages 1-3)")


def _all_gather(tensors: list[Tensor], world: int, group: Any) -> list[list[Tensor]]:
    """Every rank's ``tensors`` (equal shapes on every rank, as DeepSpeed's partitions are)."""
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in tensors]
    for t, out in zip(tensors, gathered):
        dist.all_gather(out, t.contiguous(), group=group)
    return [[gathered[i][r] for i in range(len(tensors))] for r in range(world)]


def _unsupported(what: str) -> RuntimeError:
    return RuntimeError(f"{what} is not available under DeepSpeed: the EMA is of each rank's fp32 master partitions, "
                        "not of the module's parameters; use ema_state_dict(full=True) (model-keyed, whole), "
                        "swap_ema(), and engine.save_checkpoint()/load_checkpoint(), which carry the EMA")
