"""Mixed precision and memory layout for training on a device: bf16 autocast where the GPU supports it, else fp16
with a gradient scaler; channels_last and cudnn.benchmark on CUDA; nothing of it on a CPU unless asked."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """How a training step runs: the autocast dtype (None: float32), whether a grad scaler is used, and whether
    models and batches are channels_last."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (a no-op without a dtype)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16 (its state goes into the resume state either way)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.scaler)

    def layout(self, tensor_or_model):
        """``tensor_or_model`` in channels_last when asked (a 4-D tensor or a module), else unchanged."""
        if not self.channels_last:
            return tensor_or_model
        return tensor_or_model.to(memory_format=torch.channels_last)

    def describe(self) -> str:
        """E.g. ``bf16 autocast, channels_last``, ``fp16 autocast + grad scaler`` or ``float32``."""
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        parts = [f"{names[self.dtype]} autocast{' + grad scaler' if self.scaler else ''}"
                 if self.dtype is not None else "float32"]
        return ", ".join(parts + (["channels_last"] if self.channels_last else []))


def choose_precision(device: torch.device, amp: str = "auto", channels_last: str = "auto") -> Precision:
    """The Precision for ``amp`` (auto | off | bf16 | fp16) and ``channels_last`` (auto | true | false) on
    ``device``; auto means bf16 (or fp16 + scaler without bf16 support) and channels_last on CUDA, plain float32
    on a CPU. Turns cudnn.benchmark on for CUDA (fixed input sizes)."""
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if cuda:
        torch.backends.cudnn.benchmark = True
    last = cuda if channels_last == "auto" else channels_last == "true"
    return Precision(device, dtype, scaler=dtype is torch.float16 and cuda, channels_last=last)
