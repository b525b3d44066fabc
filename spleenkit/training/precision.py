"""Mixed precision in training: the precision a run trains and validates in, and the step that trains in it.

``monai.engines``' own ``amp=True`` works on CUDA only; the kit's step (:class:`TrainingStep`, the trainer's
``iteration_update``) autocasts on every device: float16 with a gradient scaler on CUDA, bfloat16 on a CPU
with native bfloat16, where its Conv3d gradients are right for the patch
(:func:`spleenkit.devices.cpu_bf16_training_ok`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spleenkit import devices
from spleenkit.devices import Precision, amp_dtype, autocast, choose_precision, grad_scaler
from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    import torch
    from monai.engines import SupervisedTrainer

log = logging.getLogger(__name__)


def training_precision(preset: Preset | str, device: torch.device, amp: bool | None = None) -> Precision:
    """The precision training runs in on ``device`` (see :func:`spleenkit.devices.choose_precision`) for the
    request :meth:`Preset.precision_request` makes of ``amp``. On a CPU, bfloat16 only where the CPU has it natively
    and its Conv3d gradients are right for the patch size (:func:`spleenkit.devices.cpu_bf16_training_ok`)."""
    preset = get_preset(preset)
    choice = choose_precision(device, preset.precision_request(amp))
    if (choice.enabled and device.type == "cpu"
            and not devices.cpu_bf16_training_ok(preset.patch_size, preset.strides)):
        log.warning("bfloat16 Conv3d gradients are wrong in this PyTorch on this CPU for patch %s (a feature map "
                    "2 voxels deep): training in float32 instead; patches of 48 or 64 avoid it",
                    tuple(preset.patch_size))
        reason = f"bfloat16 Conv3d gradients are wrong here for patch {tuple(preset.patch_size)}: float32"
        return Precision(None, reason, choice.capability)
    return choice


def validation_precision(preset: Preset, device: torch.device, amp: bool | None = None) -> Precision:
    """The precision of validation during training: the training choice without the gradient check (no
    backward pass), so a CPU without native bfloat16 validates in float32 too."""
    return choose_precision(device, preset.precision_request(amp))


def training_amp(preset: Preset, device: torch.device, amp: bool | None = None) -> bool:
    """Whether training autocasts on ``device`` (the bundle configs' ``iteration_update`` asks this); see
    :func:`training_precision`."""
    return training_precision(preset, device, amp).enabled


def mixed_precision_step(network: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_function: Callable, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, device: torch.device, amp: bool,
                         set_to_none: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under the device's autocast (float16 on CUDA, bfloat16 on CPU),
    loss in float32, backward through the gradient scaler (active only for float16). Returns (pred, loss)."""
    network.train()
    optimizer.zero_grad(set_to_none=set_to_none)
    with autocast(device, amp):
        pred = network(inputs)
    loss = loss_function(pred.float(), targets).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return pred, loss.detach()


class TrainingStep:
    """The ``iteration_update`` of a SupervisedTrainer: :func:`mixed_precision_step` on the batch.

    Holds the gradient scaler so that checkpoints can save and restore it.
    """

    def __init__(self, device: torch.device, amp: bool = True) -> None:
        self.device = device
        self.amp = amp
        self.dtype = amp_dtype(device, amp)
        self.scaler = grad_scaler(device, amp)

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        from monai.engines.utils import IterationEvents
        from monai.utils.enums import CommonKeys as Keys

        if batchdata is None:
            raise ValueError("the training loader gave no batch")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        pred, loss = mixed_precision_step(engine.network, inputs, targets, engine.loss_function, engine.optimizer,
                                          self.scaler, self.device, self.amp, set_to_none=True)
        engine.state.output[Keys.PRED] = pred
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def make_iteration_update(device: torch.device, amp: bool = True) -> TrainingStep:
    """The mixed-precision iteration for ``SupervisedTrainer(iteration_update=...)`` (bundle configs use this)."""
    return TrainingStep(device, amp)
