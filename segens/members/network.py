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
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segens.conventions.classes import NUM_CLASSES
from segens.errors import SegensError
from segens.members.base import CheckpointReport, NetworkMember
from segens.members.class_map import channel_order
from segens.members.decode import passes_to_uint8, passes_to_uint8_torch
from segens.members.spec import MemberSpec
from segens.members.tta import Pass, mean_in_order, tta_passes
from segens.store import quantize

OUTPUT_TYPES = ("logits", "probabilities")


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


class NotProbabilities(SegensError):
    """A model declared to output probabilities gave values outside [0, 1] (``index``: the image in its batch)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.message, self.index = message, index


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
        out = out.float()
        if self.output_type == "probabilities":
            outside = ((out < 0) | (out > 1) | torch.isnan(out)).flatten(1).any(dim=1)
            if outside.any():
                index = int(torch.nonzero(outside)[0])
                low, high = torch.aminmax(out[index])
                raise NotProbabilities(f"{where}: the model's output is declared as probabilities (model.output.type "
                                       f"probabilities) but holds values from {float(low):.4g} to {float(high):.4g}: "
                                       "it returns logits? set model.output.type to logits", index)
        return out


class TorchModuleMember(NetworkMember):
    """Base of the kinds whose network is a torch module giving maps at its input's resolution (smp, torch).
    Subclasses implement ``load(path) -> LoadedModel`` (``self.trust_pickle`` says whether whole pickled models
    may load) and may set ``stride``."""

    stride = 32

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.passes = tta_passes(spec.tta)
        self._models: dict[int, LoadedModel] = {}
        cuda = self.device.type == "cuda"
        self.postprocess_on_device = cuda
        """True: the post-network work runs where the logits are (tests set it on CPU to check that code)."""
        self.channels_last = cuda and os.environ.get("SEGENS_CHANNELS_LAST") == "1"
        if cuda and os.environ.get("SEGENS_CUDNN_BENCHMARK") == "1":
            torch.backends.cudnn.benchmark = True

    # ---- what a kind provides -------------------------------------------------------------------------------
    @abstractmethod
    def load(self, path: Path) -> LoadedModel:
        """A model from a checkpoint file or folder (checked with ``checked``)."""

    # ---- shared --------------------------------------------------------------------------------------------
    def describe(self, path: Path) -> CheckpointReport:
        """The checkpoint loaded as prediction loads it, and its output on a dummy input of the contract's shape."""
        report = CheckpointReport.of_spec(path, self.spec)
        loaded = self.load(path)
        report.set_class_names(loaded.names)
        module = loaded.module
        report.parameters = sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else None
        shape = (1, self.spec.input.channels, *self.spec.input.size)
        with torch.no_grad():
            out = loaded(torch.zeros(shape, device=self.device), str(path))
        report.input_shape, report.output = shape, f"{loaded.output_type} {tuple(out.shape)} (competition class order)"
        report.input_used = self.spec.input.to_dict()
        report.notes.append("the spec's input contract is used (a contract the checkpoint records was checked against "
                            "it)")
        report.spec = {key: value for key, value in self.spec.to_dict().items() if key != "checkpoints"}
        return report

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
        shape = (1, self.spec.input.channels, *self.spec.input.size)
        try:
            with torch.no_grad():
                raw = module(torch.zeros(shape, device=self.device))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # torch's shape errors come in these
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SegensError(f"{path}: the model does not run on an input of the spec's contract, shape {shape} "
                              f"(input.channels {shape[1]}, input.size {list(shape[2:])}): {first[:300]}; fix "
                              f"the input section of {self.where}") from None
        out = output_of(raw, loaded.output_key, str(path))
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
        size = tta.input_size(self.spec.input.size, self.stride)
        if size not in cache:
            batch = self.spec.input.batch(images, size)
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            cache[size] = batch.to(self.device)
        return tta.flip(cache[size])

    def model_passes(self, model: LoadedModel, images: Sequence[np.ndarray],
                     on_device: bool = False) -> list[list[torch.Tensor]]:
        """Per image, each TTA pass's (29, h, w) float32 output of one model, flipped back; on the CPU unless
        ``on_device``."""
        outputs: list[list[torch.Tensor]] = [[] for _ in images]
        cache: dict = {}
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            for tta in self.passes:
                out = tta.flip(model(self._pass_input(images, tta, cache), self.where))
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
                try:
                    chunk_passes = self.model_passes(self.model_for(fold), chunk, on_device)
                except NotProbabilities as exc:
                    raise NotProbabilities(exc.message, start + exc.index) from None
                for index, outputs in enumerate(chunk_passes):
                    passes[start + index].extend(outputs)
        return passes

    def predict_batch(self, records, folds, split, images=None):
        try:
            return super().predict_batch(records, folds, split, images)
        except NotProbabilities as exc:
            raise SegensError(f"{exc.message} (member {self.spec.name}, first at image {records[exc.index].key})") \
                from None

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
    def term(output: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(output.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return up if probabilities else torch.sigmoid(up)

    return mean_in_order(term(output) for output in passes)
