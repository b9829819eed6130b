"""The non-finite guard: an update whose loss or gradient norm is NaN/inf is skipped and counted, and
``trainer.max_nonfinite_streak`` steps in a row of nothing but skipped updates stop the run.

Where the decision is read (``trainer.nonfinite_guard``): on the host, one flag read per update (which costs nothing
on a CPU); or on the device, where the flag goes to fused AdamW's ``found_inf`` (it leaves weights, moments and step
count alone where set), the EMAs are masked by the same flag, and the flags are read with each metrics row and
before each checkpoint, so no step waits for the GPU. Either way the counts and the stop come out the same, the
device's at most ``log_every`` steps later. The fp16 grad scaler skips an overflowing step itself.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from distill.errors import DistillError
from distill.training.optim import bare_optimizer

if TYPE_CHECKING:
    from distill.config import TrainerConfig


def guard_on_device(tc: TrainerConfig, device: torch.device, sharded: bool) -> bool:
    """Whether the guard decides on the device (``trainer.nonfinite_guard``; ``auto``: on CUDA, except under the
    fp16 grad scaler and in sharded runs, which keep the host-side guard). Call it from the trainer's constructor:
    the warning points at the constructor's caller."""
    mode = tc.nonfinite_guard
    if mode == "auto":
        cuda = device.type == "cuda"
        mode = "device" if cuda and tc.mixed_precision != "fp16" and not sharded else "sync"
    if mode == "sync":
        return False
    if tc.mixed_precision == "fp16" or sharded:
        where = "to sharded (fsdp) runs" if sharded else "with the fp16 grad scaler"
        warnings.warn(f"trainer.nonfinite_guard: device does not apply {where}; the guard reads its flag on the "
                      "host.", stacklevel=3)
        return False
    return True


class NonfiniteGuard:
    """Steps an update's optimizer unless the update is non-finite, and keeps the count of skipped updates (which
    checkpoints record) and the streak of steps whose every due update was skipped.

    Per training step: :meth:`begin_step`, :meth:`step` for each due role, :meth:`end_step`. ``flags`` (on the
    device) and ``stepped`` then say which roles' EMAs follow this step."""

    def __init__(self, on_device: bool, max_streak: int, device: torch.device):
        self.on_device = on_device
        self.max_streak = max_streak
        self.device = device
        self.skipped = 0  # skipped updates in the whole run (resumed from checkpoints)
        self.streak = 0  # consecutive steps whose every due update was skipped
        self.flags: dict[str, torch.Tensor] = {}  # on_device: this step's "skipped" flag per role
        self.stepped: set[str] = set()  # roles whose optimizer stepped in this step
        self._pending: list[list[torch.Tensor]] = []  # on_device: each unread step's flags, per due update

    def begin_step(self) -> None:
        self.flags = {}
        self.stepped = set()

    def step(self, role: str, opt: Any, loss: torch.Tensor, grad_norm: Any, *, scaler: bool) -> Any:
        """Step ``opt`` with ``role``'s gradients unless ``loss`` or ``grad_norm`` is NaN/inf (``scaler``: the fp16
        grad scaler decides). Returns what the metrics row logs as ``<role>/skipped``: the device flag, 1.0 for a
        skip decided on the host, None for an update taken."""
        if scaler:
            # fp16: the grad scaler skips an overflowing step itself and lowers its scale; pre-empting it
            # would leave the scaler unscaled-but-not-updated and break the next step.
            opt.step()
            skipped = bool(getattr(opt, "step_was_skipped", False)) or not bool(torch.isfinite(loss))
        elif self.on_device:
            bad = ~(torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device)))
            # fused AdamW leaves weights, moments and its step count alone where set
            bare_optimizer(opt).found_inf = bad.float()
            opt.step()
            self.flags[role] = bad
            self.stepped.add(role)  # counted when the flags are read (read)
            return bad
        elif bool(torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))):
            opt.step()  # the one host read per update: the decision
            skipped = False
        else:
            skipped = True  # weights, EMA and optimizer state stay as they were
        if skipped:
            self.skipped += 1
            return 1.0
        self.stepped.add(role)
        return None

    def end_step(self, due: list[str], step: int) -> None:
        """After the updates of ``step`` (the roles ``due``): count its streak, or keep its flags for :meth:`read`."""
        if self.on_device:
            self._pending.append([self.flags[r] for r in due])
        else:
            self.count_streak(bool(due) and not self.stepped, step)

    def read(self, step: int) -> None:
        """on_device: read the flags of the steps before ``step`` since the last read (one sync), and count skipped
        updates and the streak of all-skipped steps as the host-side guard does step by step."""
        if not self._pending:
            return
        steps, self._pending = self._pending, []
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        counts = torch.stack([torch.stack(f).sum() if f else zero for f in steps]).tolist()  # the one host read
        first = step - len(steps)  # the index of the first unread step
        for i, (flags, n_skipped) in enumerate(zip(steps, counts)):
            self.skipped += int(n_skipped)
            self.count_streak(bool(flags) and n_skipped == len(flags), first + i)

    def count_streak(self, all_skipped: bool, step: int) -> None:
        """The run of steps whose every due update was skipped (a step with none due ends it); stops the run at
        ``max_streak``. Skipped updates leave the weights as they were."""
        if not all_skipped:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.max_streak:
            raise DistillError(
                f"{self.streak} steps in a row had a NaN/inf loss or gradient (step {step}); stopped. Each such "
                "update was skipped, and the last good checkpoint is kept. Lower the learning rate, enable grad_clip, "
                "or check the data, then run the same command to resume."
            )
