"""The methods a user calls on an EMA, whatever drives it: :class:`EMAFrontEnd`.

:class:`~triton_ema.EMAOptimizer` (a wrapper, or attached to an optimizer's
hooks) and any other front end over an :class:`~triton_ema.ema.EMA` core take
them by subclassing; a front end sets ``self.core``. One whose model holds
copies of the averaged tensors (16-bit weights beside fp32 master weights)
overrides :meth:`EMAFrontEnd.swap_ema` to pass ``after=`` to
:class:`~triton_ema.swap.SwapContext`, which runs it after the swap in and
after the swap out.
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .checkpoint import EMACheckpoint, model_keyed
from .migrate import checked_values
from .module import ema_module
from .sharding import full as whole
from .sharding import like, local
from .swap import SwapContext

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["EMAFrontEnd"]


def _core_attribute(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.core, name), lambda self, value: setattr(self.core, name, value),
                    doc=doc)


class EMAFrontEnd:
    """Swaps, EMA modules, EMA state dicts and the step count of ``self.core``."""

    core: EMA

    schedules = _core_attribute("schedules", "The EMA profiles' schedules by name; ``{None: schedule}`` for one.")
    schedule = _core_attribute("schedule", "The schedule of the one profile, or a dict of every profile's.")
    interval = _core_attribute("interval", "The EMA is updated every ``interval`` steps.")
    model = _core_attribute("model", "The module given as ``model=``, or None.")
    update_buffers = _core_attribute("update_buffers", "Whether the model's floating buffers are averaged too.")
    skip_nonfinite = _core_attribute("skip_nonfinite", "Whether a bucket holding NaN or Inf skips its update.")
    overlap = _core_attribute("overlap", "Whether the update runs on a side CUDA stream.")
    run_id = _core_attribute("run_id", "Tells this run's post-hoc snapshots from another's.")

    @property
    def num_steps(self) -> int:
        """Optimizer steps completed so far (the next step has t = num_steps); with
        ``capturable=True`` read from the device counter (it waits for the device)."""
        return self.core.num_steps

    @property
    def capturable(self) -> bool:
        """Whether the step count and momenta live on the device (``capturable=True``)."""
        return self.core.capturable

    @property
    def skipped_updates(self) -> int:
        """With ``skip_nonfinite=True``: bucket updates skipped because their
        params held NaN or Inf (reading it waits for the device). Saved and
        restored with the checkpoint."""
        return self.core.skipped_updates

    def swap_ema(self, name: str | None = None) -> SwapContext:
        """``with opt.swap_ema():`` the model holds the EMA weights; on exit, also
        by an exception, the training weights are back, bitwise.

        Inside the block the averaged parameters are the EMA: what the block
        writes to them becomes the EMA (elements it leaves alone keep their
        exact shadow values, for every dtype pair). Averaged buffers are put back
        on exit if the block changed them (a forward in train mode), with a
        warning. If the block moves the model to another dtype or device, the
        training weights still come back (into the moved tensors), the EMA keeps
        its values from before the move, and the exit raises an error. With equal
        dtypes the swap is an in-place exchange; with a wider shadow the training
        weights wait in a temporary and the shadow is never rounded. Under FSDP2,
        with ``model=``, every FSDP2 module is resharded on entry and exit.

        Args:
            name: The profile to swap in; required with several profiles, omitted
                with one.

        Returns:
            A context manager. Used without ``with`` it swaps nothing and warns.

        Raises:
            RuntimeError: Nested in another ``swap_ema()``; and ``step()``,
                ``load_state_dict()`` or ``add_param_group()`` inside the block.
            ValueError: A missing or unknown profile name (the error lists the
                names).
        """
        return SwapContext(self.core, self.core.profile(name), self)

    def ema_module(self, name: str | None = None) -> nn.Module:
        """The EMA as a module with the model's structure, to run forward every step.

        Its averaged parameters and buffers are the EMA storage itself: no copy,
        the current EMA after every ``step()`` (the same object keeps following;
        calling this again returns it), ``requires_grad=False``, the training
        model untouched. It holds the shadows as stored (a bfloat16 model's EMA
        module is float32; with ``device="cpu"`` it is on the CPU) and starts in
        the model's train or eval mode. Needs ``model=``.

        Args:
            name: The profile; required with several profiles.

        Returns:
            The EMA module (a deep copy of the model's modules, not of its tensors).

        Raises:
            RuntimeError: Without ``model=``, or inside :meth:`swap_ema` (the
                module itself refuses to run or give its ``state_dict()`` inside
                :meth:`swap_ema`, or after its own tensors were replaced).
            NotImplementedError: Sharded (DTensor, FSDP2) parameters, whose
                forward needs the training model's all-gathers.
            ValueError: A missing or unknown profile name.
        """
        return ema_module(self.core, self.core.profile(name))

    def ema_state_dict(self, name: str | None = None, *, full: bool = False) -> dict[str, Tensor]:
        """``model.state_dict()`` with the EMA in place of every averaged tensor.

        The keys are ``model.state_dict()``'s: with ``model=`` a wrapper (DDP,
        ``torch.compile``, ...) they carry its prefixes (``module.``,
        ``_orig_mod.``) and load into that wrapper;
        ``triton_ema.load_ema_weights(opt.state_dict(), model=bare)`` gives the
        same keyed for the bare model.

        Values are in the model's dtypes; entries not averaged keep the model's
        values. Every value is a copy: it keeps what it held when this was called
        (inside :meth:`swap_ema` too), whatever training does next. Needs
        ``model=``.

        Args:
            name: The profile; required with several profiles.
            full: Sharded (DTensor) entries stay DTensors by default, as
                ``set_model_state_dict`` takes them; ``full=True`` gathers them
                into whole tensors for export (a collective: every rank must
                call it).

        Returns:
            A dict ready for ``model.load_state_dict``.

        Raises:
            RuntimeError: Without ``model=``.
            ValueError: A missing or unknown profile name.
        """
        out = {}
        for key, value, ema in model_keyed(self.core, name, "ema_state_dict()"):
            shard = local(value) if ema is None else ema
            copy = like(shard.detach().to(value.dtype, copy=True), value)
            out[key] = whole(copy) if full else copy
        return out

    def load_ema_state_dict(self, state_dict: dict[str, Tensor], *, num_steps: int) -> None:
        """Start the EMA from weights averaged elsewhere.

        With several profiles, every profile starts from these weights. Needs
        ``model=``. Keys match the model's once wrapper prefixes (``module.``,
        ``_orig_mod.``, ...) are removed. Names, shapes and dtypes are checked
        before anything changes; entries the EMA does not average are ignored.

        Args:
            state_dict: EMA weights keyed like ``model.state_dict()`` (see
                :mod:`triton_ema.migrate` for other libraries' formats), in the
                model's or the shadow's dtype.
            num_steps: The optimizer steps taken so far; the schedule continues at
                ``t = num_steps``.

        Raises:
            RuntimeError: Without ``model=``, or inside :meth:`swap_ema`.
            TypeError: ``state_dict`` is not a dict, or holds a non-tensor.
            ValueError: A negative or non-integer ``num_steps``; an entry the model
                lacks, an averaged entry missing, a wrong shape or dtype (naming
                the entry).
        """
        core = self.core
        core.refuse_while_swapped("load_ema_state_dict()")
        if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
        values = checked_values(core, state_dict)
        core.load(int(num_steps), core.store.skipped(), [values] * len(core.schedules))

    @property
    def ema_checkpoint(self) -> EMACheckpoint:
        """The ``"ema"`` part of :meth:`~triton_ema.EMAOptimizer.state_dict` as a ``torch.distributed.checkpoint`` ``Stateful``.

        Put it in the dict given to ``dcp.save`` / ``dcp.load`` beside the model
        and the wrapped optimizer's state (``opt.optimizer``); ``dcp.load``
        loads the EMA in place, step count included, on any number of ranks."""
        return EMACheckpoint(self.core)
