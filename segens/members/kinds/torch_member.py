"""Members of kind ``torch``: any network trained elsewhere, not built by smp, predicting through the shared network
path (input contract, TTA, class mapping, fold averaging; segens.members.network).

```yaml
kind: torch
input: {size: [512, 512], color: bgr, normalize: imagenet}
classes: [...]                       # the output channel order, unless the model carries names
model:
  factory: mypackage.models:build    # or path/to/file.py:build (relative to the spec); for state_dicts
  kwargs: {num_classes: 29}          # keyword arguments of the factory
  output: {type: logits, key: out}   # logits | probabilities; key of a dict output (default out)
  format: auto                       # auto | torchscript | state_dict | pickle
  stride: 32                         # sizes of scaled TTA passes are multiples of this
checkpoints: {0: {path: fold0.pt, sha256: ...}}
```

A checkpoint is a TorchScript file (loading runs no Python code from it), a state_dict loaded into the module the
factory builds, or a whole pickled model, only with ``--trust-pickle``. Importing the factory runs code the spec
names, and a spec travels between people like a checkpoint does: it is done only with ``--trust-code``
(``ens inspect`` without it says what it would import and runs nothing). Class names come from a ``classes`` attribute of the module, else the spec.
Training is the user's own script: ``ens train-member`` does not train this kind.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from segens.errors import SegensError
from segens.infra.safeload import require_regular, torch_load_data, torch_load_pickle
from segens.members.base import CheckpointReport
from segens.members.class_map import names_from
from segens.members.network import OUTPUT_TYPES, LoadedModel, TorchModuleMember, load_weights
from segens.members.registry import register

MODEL_FIELDS = ("factory", "kwargs", "output", "format", "stride")
FORMATS = ("auto", "torchscript", "state_dict", "pickle")
STATE_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly nest a state_dict in a saved dict."""


def is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive (a zip holding TorchScript code, not only pickled data)."""
    require_regular(path, "checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def factory_parts(factory: Any, where: str, base: Path | None = None) -> tuple[str | Path, str]:
    """(the module name or the absolute file, the function) that ``model.factory`` names; nothing is imported."""
    module_name, _, function = str(factory).partition(":")
    if not module_name or not function:
        raise SegensError(f"{where}: model.factory {factory!r} must look like 'package.module:function' or "
                          "'file.py:function'")
    if module_name.endswith(".py"):
        file = Path(module_name) if Path(module_name).is_absolute() else (base or Path.cwd()) / module_name
        return file.resolve(), function
    return module_name, function


def import_factory(factory: str, where: str, base: Path | None = None) -> Any:
    """The callable named ``module:function`` (or ``file.py:function``, relative to ``base``); a SegensError
    naming the factory when it does not import or is not there. Writes no ``__pycache__`` beside the file."""
    module_name, function = factory_parts(factory, where, base)
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # a factory file next to a spec is the user's folder, not a cache
    try:
        if isinstance(module_name, Path):
            file = module_name
            loader_spec = importlib.util.spec_from_file_location(f"segens_factory_{file.stem}", file)
            if loader_spec is None or not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[loader_spec.name] = module
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise SegensError(f"{where}: model.factory {factory!r} does not import ({type(exc).__name__}: {exc}); "
                          "put its package on PYTHONPATH or give 'file.py:function'") from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    if not callable(getattr(module, function, None)):
        raise SegensError(f"{where}: model.factory {factory!r}: module {str(factory).partition(':')[0]!r} has no "
                          f"function {function!r}")
    return getattr(module, function)


@register("torch")
class TorchMember(TorchModuleMember):
    """Adapter for user networks: loads TorchScript, factory + state_dict or (trusted) pickled models."""

    model_fields = MODEL_FIELDS
    cannot_train = "its models are trained by your own script"

    def parse_model(self, section: dict[str, Any]) -> dict[str, Any]:
        """The output convention, checkpoint format, factory keyword arguments and stride, checked."""
        where = self.where
        output = section.get("output") or {}
        if not isinstance(output, dict) or set(output) - {"type", "key"}:
            raise SegensError(f"{where}: model.output must be a mapping with 'type' and/or 'key', got {output!r}")
        self.output_type = output.get("type", "logits")
        if self.output_type not in OUTPUT_TYPES:
            raise SegensError(f"{where}: model.output.type {self.output_type!r} is unknown; use logits or probabilities")
        self.output_key = output.get("key")
        if self.output_key is not None and not isinstance(self.output_key, str):
            raise SegensError(f"{where}: model.output.key must be a string, got {self.output_key!r}")
        self.format = section.get("format", "auto")
        if self.format not in FORMATS:
            raise SegensError(f"{where}: model.format {self.format!r} is unknown; use one of {', '.join(FORMATS)}")
        if not isinstance(section.get("kwargs") or {}, dict):
            raise SegensError(f"{where}: model.kwargs must be a mapping of the factory's keyword arguments")
        stride = section.get("stride", 32)
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise SegensError(f"{where}: model.stride must be a positive integer, got {stride!r}")
        self.stride = stride
        return section

    def load(self, path: Path) -> LoadedModel:
        """A checked model with its output convention and class order."""
        path = Path(path)
        module = self.load_module(path)
        order, names = self.class_order(names_from(getattr(module, "classes", None)), path)
        return self.checked(LoadedModel(module, order, self.output_type, self.output_key, names), path)

    def describe(self, path: Path) -> CheckpointReport:
        """As prediction loads it; without ``trust_code``, a state_dict's report names the factory it would import
        and runs nothing."""
        path = Path(path)
        if self.trust_code or self._script_or_pickle(path):
            return super().describe(path)
        state = self._state_dict(path)
        report = CheckpointReport.of_spec(path, self.spec)
        report.parameters = sum(tensor.numel() for tensor in state.values())
        report.needs_trust_code = True
        report.notes.append(f"the model is built by {self.factory_description()}: code the spec names, not run. "
                            "Pass --trust-code if you trust the spec, to build it, load the weights and check one "
                            "input of the contract's shape")
        report.spec = {key: value for key, value in self.spec.to_dict().items() if key != "checkpoints"}
        return report

    def factory_description(self) -> str:
        """What importing ``model.factory`` would run, in words (nothing is imported)."""
        module, function = factory_parts(self.spec.model.get("factory"), self.where, self._base())
        where = f"the file {module}" if isinstance(module, Path) else f"the module {module}"
        return f"{function}(**model.kwargs) from {where}"

    def _base(self) -> Path | None:
        return Path(self.spec.path).parent if self.spec.path else None

    def _script_or_pickle(self, path: Path) -> bool:
        """Whether the checkpoint loads without the factory (TorchScript, or a whole pickled model)."""
        if not path.is_file():
            raise SegensError(f"{path}: checkpoint not found (member {self.spec.name}); fix the spec's path")
        if self.format in ("torchscript", "pickle") or (self.format == "auto" and is_torchscript(path)):
            return True
        return self.format == "auto" and torch_load_data(path, "torch checkpoint") is None

    def _state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        payload = torch_load_data(path, "torch checkpoint")
        if payload is None:
            raise SegensError(f"{path}: holds pickled objects, not a state_dict (model.format is state_dict)")
        return state_dict_of(payload, path)

    def load_module(self, path: Path) -> torch.nn.Module:
        """The module of a checkpoint, by ``model.format`` (auto: TorchScript if the file is one, else torch.load)."""
        if not path.is_file():
            raise SegensError(f"{path}: checkpoint not found (member {self.spec.name}); fix the spec's path")
        if self.format == "torchscript" or (self.format == "auto" and is_torchscript(path)):
            try:
                with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; users' files still are
                    warnings.simplefilter("ignore", FutureWarning)
                    return torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
                raise SegensError(f"{path}: not a TorchScript file ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with "
                                  "torch.jit.save(torch.jit.script(model)) or use model.format state_dict") from None
        if self.format == "pickle":
            return self._pickled(path)
        payload = torch_load_data(path, "torch checkpoint")
        if payload is None:
            if self.format == "state_dict":
                raise SegensError(f"{path}: holds pickled objects, not a state_dict (model.format is state_dict)")
            return self._pickled(path)
        return self._from_state_dict(state_dict_of(payload, path), path)

    def _pickled(self, path: Path) -> torch.nn.Module:
        if not self.trust_pickle:
            raise SegensError(f"{path}: holds a whole pickled model; loading it runs code stored in the file. Pass "
                              "--trust-pickle if you trust its source, or save a state_dict and give model.factory")
        model = torch_load_pickle(path, "model")
        if not isinstance(model, torch.nn.Module):
            raise SegensError(f"{path}: the pickle holds a {type(model).__name__}, not a torch model")
        return model

    def build(self) -> torch.nn.Module:
        """A fresh module from ``model.factory(**model.kwargs)``."""
        factory = self.spec.model.get("factory")
        if not factory:
            raise SegensError(f"{self.where}: a state_dict checkpoint needs model.factory ('package.module:function' "
                              "that builds the model)")
        if not self.trust_code:
            raise SegensError(f"{self.where}: building the model runs code the spec names: "
                              f"{self.factory_description()} (model.factory). Pass --trust-code if you trust the "
                              "spec and that code, as --trust-pickle is passed for a pickle")
        function = import_factory(factory, self.where, self._base())
        try:
            module = function(**(self.spec.model.get("kwargs") or {}))
        except Exception as exc:  # noqa: BLE001 - the user's function may fail in any way
            raise SegensError(f"{self.where}: model.factory {factory!r} failed ({type(exc).__name__}: {exc})") from None
        if not isinstance(module, torch.nn.Module):
            raise SegensError(f"{self.where}: model.factory {factory!r} returns {type(module).__name__}, "
                              "not a torch.nn.Module; it must build and return the model")
        return module

    def _from_state_dict(self, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
        return load_weights(self.build(), state, f"{path}: the state_dict does not fit the module of model.factory "
                                                 f"{self.spec.model.get('factory')!r}")


def state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state_dict, possibly nested under a common key ({"state_dict": ...}, {"model": ...})."""
    if isinstance(payload, dict):
        for key in STATE_KEYS:
            if isinstance(payload.get(key), dict) and payload[key] and all(
                    isinstance(v, torch.Tensor) for v in payload[key].values()):
                return payload[key]
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return payload
    raise SegensError(f"{path}: neither a state_dict nor a dict holding one under {', '.join(STATE_KEYS)}")
