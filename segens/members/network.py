"""The prediction path shared by every member kind that runs a torch network (smp, torch): the input contract,
TTA passes, class mapping by name, fold averaging and output to uint8. A kind only says how it loads a model.

Per image, the passes are fold by fold, and within a fold: the plain pass, then each TTA entry in the spec's
order (``hflip``, ``vflip``, ``{scale: s}``: the image resized to ``s`` x the input size, rounded to a multiple of
``stride``). Each pass's output is flipped back, upsampled bilinearly straight to the image's original size, put
through the sigmoid (for logits) and averaged in probability space; ``predict_uint8`` gives exactly the quantized
``predict`` while computing only where a class can be non-zero.

On a GPU the work after the network stays there (``postprocess.passes_to_uint8_torch``: upsampling, sigmoid,
mean, quantization and boxes on the device; only the uint8 values inside the boxes reach the host). On CPU the
exact region path of ``postprocess.passes_to_uint8`` runs. ``SEGENS_CHANNELS_LAST=1`` and
``SEGENS_CUDNN_BENCHMARK=1`` turn on channels_last memory format and cuDNN autotuning, on CUDA only (bench/gpu.py
measures both).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segens.conventions.classes import NUM_CLASSES
from segens.errors import SegensError
from segens.members.class_map import channel_order
from segens.members.decode import passes_to_uint8, passes_to_uint8_torch
from segens.members.spec import MemberSpec
from segens.store import quantize

OUTPUT_TYPES = ("logits", "probabilities")


@dataclass(frozen=True)
class Pass:
    """One test-time pass: flips and the input scale (1 is the spec's input size)."""

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0


def tta_passes(tta: Sequence[Any]) -> list[Pass]:
    """The plain pass followed by one pass per TTA entry, in the spec's order."""
    passes = [Pass()]
    for entry in tta:
        if entry == "hflip":
            passes.append(Pass(hflip=True))
        elif entry == "vflip":
            passes.append(Pass(vflip=True))
        else:
            passes.append(Pass(scale=float(entry["scale"])))
    return passes


def scaled_size(size: Sequence[int], scale: float, stride: int) -> tuple[int, int]:
    """``size`` x ``scale`` with each side rounded to a multiple of ``stride`` (at least one stride)."""
    return tuple(max(stride, int(round(side * scale / stride)) * stride) for side in size)  # type: ignore[return-value]


def output_of(raw: Any, key: str | None, where: str) -> torch.Tensor:
    """The map tensor of a forward's result: the tensor itself, ``raw[key]`` of a dict (key default 'out'), or
    the first item of a tuple/list; a SegensError naming a key the forward does not return."""
    if isinstance(raw, dict):
        key = key or "out"
        if key not in raw:
            raise SegensError(f"{where}: the model's forward returns a dict without key {key!r} (keys: "
                              f"{', '.join(map(str, raw))}); set model.output.key to one of them")
        raw = raw[key]
    elif isinstance(raw, (tuple, list)):
        if not raw:
            raise SegensError(f"{where}: the model's forward returns an empty {type(raw).__name__}")
        raw = raw[0]
    elif key is not None and not isinstance(raw, torch.Tensor):
        raise SegensError(f"{where}: model.output.key is {key!r} but the forward returns {type(raw).__name__}")
    if not isinstance(raw, torch.Tensor):
        raise SegensError(f"{where}: the model's forward returns {type(raw).__name__}, not a tensor")
    return raw


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], problem: str) -> torch.nn.Module:
    """``module`` with ``state`` loaded strictly; a mismatch is a SegensError starting with ``problem`` (which names
    the file and what the weights should fit) and quoting torch's first lines."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines()[:2])[:300]
        raise SegensError(f"{problem} ({message})") from None
    return module


@dataclass
class LoadedModel:
    """A ready model: the callable, the competition-class -> model-channel order (None: same order), the
    output's type (logits or probabilities) and dict key, and the class names it carries."""

    module: Callable[..., Any]
    order: list[int] | None = None
    output_type: str = "logits"
    output_key: str | None = None
    names: list[str] | None = None

    def __call__(self, batch: torch.Tensor, where: str = "model") -> torch.Tensor:
        """(N, C, h, w) input -> (N, 29, h', w') float32 output in the competition's class order."""
        out = output_of(self.module(batch), self.output_key, where)
        if out.ndim != 4:
            raise SegensError(f"{where}: the model outputs shape {tuple(out.shape)}; segens needs (N, classes, h, w)")
        if self.order is not None:
            out = out[:, self.order]
        return out.float()


class NetworkMember:
    """Base of the adapters whose members run a network. Subclasses implement ``load(path) -> LoadedModel``
    (``self.trust_pickle`` says whether whole pickled models may load) and may set ``stride``."""

    uses_folds = True
    stride = 32

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False) -> None:
        self.spec = spec
        self.where = spec.where
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.trust_pickle = trust_pickle
        self.passes = tta_passes(spec.tta)
        self._models: dict[int, LoadedModel] = {}
        cuda = self.device.type == "cuda"
        self.postprocess_on_device = cuda
        """True: the post-network work runs where the logits are (tests set it on CPU to check that code)."""
        self.channels_last = cuda and os.environ.get("SEGENS_CHANNELS_LAST") == "1"
        if cuda and os.environ.get("SEGENS_CUDNN_BENCHMARK") == "1":
            torch.backends.cudnn.benchmark = True

    # ---- what a kind provides -------------------------------------------------------------------------------
    def load(self, path: Path) -> LoadedModel:
        """A model from a checkpoint file or folder (checked with ``checked``)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------------------
    def read_image(self, path: str | Path) -> np.ndarray:
        """An image as the input contract reads it: (H, W) gray or (H, W, 3) colour uint8."""
        return self.spec.input.read(path)

    def class_order(self, model_names: Sequence[str] | None, path: Path) -> tuple[list[int] | None, list[str] | None]:
        """(order, names) from the checkpoint's class names or the spec's ``classes``."""
        return channel_order(self.spec.classes, model_names, self.where, path)

    def checked(self, loaded: LoadedModel, path: Path) -> LoadedModel:
        """Move to the device, eval mode, and one dummy forward: the output key and class count must fit."""
        module = loaded.module
        if isinstance(module, torch.nn.Module):
            module.eval().to(self.device)
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
        channels = self.spec.input.channels
        with torch.no_grad():
            out = output_of(module(torch.zeros(1, channels, *self.spec.input.size, device=self.device)),
                            loaded.output_key, str(path))
        count = out.shape[1] if out.ndim == 4 else None
        if count != NUM_CLASSES:
            raise SegensError(f"{path}: the model outputs shape {tuple(out.shape)}; segens needs (N, {NUM_CLASSES}, h, w), "
                              "one channel per class")
        return loaded

    def model_for(self, fold: int) -> LoadedModel:
        if fold not in self._models:
            self._models[fold] = self.load(self.spec.checkpoint(fold).path)
        return self._models[fold]

    def _pass_input(self, images: Sequence[np.ndarray], tta: Pass, cache: dict) -> torch.Tensor:
        size = scaled_size(self.spec.input.size, tta.scale, self.stride) if tta.scale != 1 else self.spec.input.size
        if size not in cache:
            batch = self.spec.input.batch(images, size)
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            cache[size] = batch.to(self.device)
        batch = cache[size]
        if tta.hflip:
            batch = batch.flip(-1)
        if tta.vflip:
            batch = batch.flip(-2)
        return batch

    def model_passes(self, model: LoadedModel, images: Sequence[np.ndarray],
                     on_device: bool = False) -> list[list[torch.Tensor]]:
        """Per image, each TTA pass's (29, h, w) float32 output of one model, flipped back; on the CPU unless
        ``on_device``."""
        outputs: list[list[torch.Tensor]] = [[] for _ in images]
        cache: dict = {}
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            for tta in self.passes:
                out = model(self._pass_input(images, tta, cache), self.where)
                if tta.hflip:
                    out = out.flip(-1)
                if tta.vflip:
                    out = out.flip(-2)
                out = out.float() if on_device else out.float().cpu()
                for index in range(len(images)):
                    outputs[index].append(out[index])
        return outputs

    def pass_outputs(self, images: Sequence[np.ndarray], folds: Sequence[int],
                     on_device: bool = False) -> list[list[torch.Tensor]]:
        """Per image, its (29, h, w) float32 outputs (on the CPU unless ``on_device``): fold by fold, each with its
        TTA passes."""
        batch_size = int(self.spec.train.get("predict_batch_size", 4))
        passes: list[list[torch.Tensor]] = [[] for _ in images]
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for fold in folds:
                for index, outputs in enumerate(self.model_passes(self.model_for(fold), chunk, on_device)):
                    passes[start + index].extend(outputs)
        return passes

    def _output_type(self, folds: Sequence[int]) -> str:
        return self.model_for(folds[0]).output_type if folds else "logits"

    def predict(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[np.ndarray]:
        """Images (as ``read_image`` gives them) -> (29, H, W) float32 probabilities: each pass upsampled bilinearly
        to the image's size (then sigmoid, for logits), summed in pass order, divided by the pass count."""
        probabilities = self._output_type(folds) == "probabilities"
        results = []
        for image, passes in zip(images, self.pass_outputs(images, folds)):
            results.append(average_passes(passes, *image.shape[:2], probabilities).numpy())
        return results

    def predict_uint8(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[tuple[np.ndarray, list | None]]:
        """The quantized ``predict`` with per-class boxes. On the CPU path (logits upsampled only where a class can be
        non-zero) the values are identical to quantizing ``predict``; with ``postprocess_on_device`` (the default on
        CUDA) they are computed where the network ran, by the same torch code, and the device's float kernels may
        move a value by one level (bench/gpu.py measures how often)."""
        probabilities = self._output_type(folds) == "probabilities"
        where = f"member {self.spec.name}"
        if self.postprocess_on_device:
            return [passes_to_uint8_torch(passes, *image.shape[:2], where, probabilities=probabilities)
                    for image, passes in zip(images, self.pass_outputs(images, folds, on_device=True))]
        if probabilities:
            return [(quantize(p), None) for p in self.predict(images, folds)]
        return [passes_to_uint8(passes, *image.shape[:2], where=where)
                for image, passes in zip(images, self.pass_outputs(images, folds))]


def average_passes(passes: Sequence[torch.Tensor], height: int, width: int, probabilities: bool = False) -> torch.Tensor:
    """The float32 definition: each (C, h, w) pass upsampled bilinearly (align_corners=False) to (height, width),
    sigmoid unless already ``probabilities``, summed in order and divided by the count."""
    total = None
    for output in passes:
        term = F.interpolate(output.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        term = term if probabilities else torch.sigmoid(term)
        total = term if total is None else total + term
    return total / np.float32(len(passes))
