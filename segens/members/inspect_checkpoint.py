"""``ens inspect CHECKPOINT [--spec SPEC]``: what a checkpoint holds and what a member spec for it must say.

It loads the checkpoint (never writes anything): its format, architecture and encoder when known, the class names
it carries and how they map to the competition's, the input contract it records, its parameter count and its
output on a dummy input. With a spec, the checkpoint is loaded exactly as ``ens predict-member`` would load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from segens.conventions.classes import NUM_CLASSES
from segens.errors import SegensError
from segens.infra.safeload import require_regular, torch_load_data, torch_load_pickle
from segens.members.base import CheckpointReport
from segens.members.class_map import names_from

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
DUMMY_SIDE = 256
"""Side of the dummy input when neither the checkpoint nor a spec gives an input size."""


def inspect_checkpoint(path: str | Path, spec_path: str | Path | None = None,
                       trust_pickle: bool = False, trust_code: bool = False) -> CheckpointReport:
    """Load ``path`` (with the spec's member kind when ``spec_path`` is given) and describe it."""
    path = require_regular(path, "checkpoint")
    if not path.exists():
        raise SegensError(f"{path}: checkpoint not found")
    if spec_path is not None:
        return _with_spec(path, Path(spec_path), trust_pickle, trust_code)
    if path.is_dir():
        return _pretrained(path)
    from segens.members.kinds.torch_member import is_torchscript

    if is_torchscript(path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged archive
                raise SegensError(f"{path}: a damaged TorchScript file ({type(exc).__name__})") from None
        report = CheckpointReport(path, "TorchScript", kind="torch")
        return _describe_module(report, module, None)
    payload = torch_load_data(path, "torch checkpoint")
    return _pickled(path, trust_pickle) if payload is None else _weights(path, payload)


def _with_spec(path: Path, spec_path: Path, trust_pickle: bool, trust_code: bool) -> CheckpointReport:
    from segens.members.registry import build_member
    from segens.members.spec import load_spec

    return build_member(load_spec(spec_path), trust_pickle=trust_pickle, trust_code=trust_code).describe(path)


def _pretrained(path: Path) -> CheckpointReport:
    import segmentation_models_pytorch as smp

    from segens.members.kinds.smp import pretrained_class_names

    try:
        config = json.loads((path / "config.json").read_text())
        module = smp.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure is a bad folder
        raise SegensError(f"{path}: not an smp save_pretrained folder ({exc})") from None
    report = CheckpointReport(path, "smp save_pretrained folder", kind="smp",
                              architecture=config.get("_model_class"), encoder=config.get("encoder_name"))
    return _describe_module(report, module, pretrained_class_names(path))


def _weights(path: Path, payload: Any) -> CheckpointReport:
    from segens.members.kinds.smp import CHECKPOINT_FORMAT, checkpoint_model, recorded_input

    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        module = checkpoint_model(payload, path)
        report = CheckpointReport(path, f"segens smp checkpoint (version {payload.get('version', 1)})", kind="smp",
                                  architecture=payload["architecture"], encoder=payload["encoder"],
                                  recorded_input=recorded_input(payload))
        if payload.get("options"):
            report.spec["model"] = {"architecture": payload["architecture"], "encoder": payload["encoder"],
                                    "options": payload["options"]}
        pseudo = payload.get("pseudo")
        if isinstance(pseudo, dict):  # segens.training.loop records the pseudo-labels a checkpoint was trained with
            report.notes.append(f"trained with {pseudo.get('images')} pseudo-labelled images of {pseudo.get('folder')}"
                                f" (recipe sha256 {pseudo.get('recipe_sha256')})")
        return _describe_module(report, module, names_from(payload.get("classes")))
    from segens.members.kinds.torch_member import state_dict_of

    state = state_dict_of(payload, path)
    report = CheckpointReport(path, f"state_dict ({len(state)} tensors)", kind=None,
                              parameters=sum(t.numel() for key, t in state.items() if not key.endswith(_BUFFERS)))
    report.notes.append("a state_dict holds no architecture: inspect it again with --spec, using kind smp "
                        "(model.architecture, model.encoder) or kind torch (model.factory)")
    heads = [(key, tuple(t.shape)) for key, t in state.items() if t.ndim >= 1][-2:]
    report.output = "last tensors: " + ", ".join(f"{key} {shape}" for key, shape in heads)
    report.spec = {"kind": "smp or torch", "input": "as the training script made its tensors (see README)"}
    return report


def _pickled(path: Path, trust_pickle: bool) -> CheckpointReport:
    if not trust_pickle:
        report = CheckpointReport(path, "pickle (whole objects)", needs_trust_pickle=True)
        report.notes.append("loading it runs code stored in the file: pass --trust-pickle if you trust its source")
        report.spec = {"kind": "smp, torch or yolo (seen with --trust-pickle)"}
        return report
    payload = torch_load_pickle(path, "checkpoint")
    if isinstance(payload, dict) and "train_args" in payload and (payload.get("model") or payload.get("ema")):
        model = payload.get("model") or payload["ema"]
        report = CheckpointReport(path, "ultralytics checkpoint", kind="yolo", needs_trust_pickle=True,
                                  architecture=str(payload["train_args"].get("model")))
        report.set_class_names(names_from(getattr(model, "names", None)))
        report.parameters = sum(p.numel() for p in model.parameters())
        size = payload["train_args"].get("imgsz")
        report.output = f"{getattr(model, 'task', 'segment')} model trained at imgsz {size}"
        report.spec = {"kind": "yolo", "input": {"size": size, "color": "bgr"}}
        return report
    if not isinstance(payload, torch.nn.Module):
        raise SegensError(f"{path}: the pickle holds a {type(payload).__name__}, neither a model nor a checkpoint "
                          "segens knows")
    name = getattr(payload, "name", None)
    is_smp = type(payload).__module__.startswith("segmentation_models_pytorch")
    report = CheckpointReport(path, f"pickled model ({type(payload).__module__}.{type(payload).__name__})",
                              kind="smp" if is_smp else "torch", needs_trust_pickle=True,
                              architecture=type(payload).__name__,
                              encoder=name.split("-", 1)[1] if is_smp and isinstance(name, str) and "-" in name else None)
    return _describe_module(report, payload, names_from(getattr(payload, "classes", None)))


def _describe_module(report: CheckpointReport, module: Any, names: list[str] | None) -> CheckpointReport:
    """Parameters, class mapping, a dummy forward and the spec fields it implies."""
    report.set_class_names(names)
    if isinstance(module, torch.nn.Module):
        module.eval()
        report.parameters = sum(p.numel() for p in module.parameters())
    size = (report.recorded_input or {}).get("size") or [DUMMY_SIDE, DUMMY_SIDE]
    channels = int((report.recorded_input or {}).get("channels", 3))
    report.input_shape = (1, channels, *size)
    try:
        with torch.no_grad():
            raw = module(torch.zeros(report.input_shape))
        report.output = _describe_output(raw)
    except Exception as exc:  # noqa: BLE001 - the forward is the user's code
        report.output = f"the forward failed on {report.input_shape} ({type(exc).__name__}: {exc})"
    spec: dict[str, Any] = {"kind": report.kind}
    spec["input"] = report.recorded_input or "not recorded: say how the training script made its tensors"
    if names is None:
        spec["classes"] = "only if the output channels are not in the competition's order"
    if report.kind == "smp":
        spec["model"] = report.spec.get("model") or {"architecture": report.architecture or "?",
                                                     "encoder": report.encoder or "?"}
    elif report.kind == "torch" and isinstance(raw_key := _dict_key(module, report), str):
        spec["model"] = {"output": {"type": "logits", "key": raw_key}}
    report.spec = spec
    return report


def _dict_key(module: Any, report: CheckpointReport) -> str | None:
    """The key holding the maps when the forward returns a dict (from the output description)."""
    if report.output and report.output.startswith("dict"):
        return "out" if "'out'" in report.output else report.output.split("'")[1]
    return None


def _describe_output(raw: Any) -> str:
    if isinstance(raw, torch.Tensor):
        return f"tensor {tuple(raw.shape)}" + ("" if raw.ndim == 4 and raw.shape[1] == NUM_CLASSES else
                                               f" (segens needs (N, {NUM_CLASSES}, h, w))")
    if isinstance(raw, dict):
        parts = [f"{key!r}: " + (f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__)
                 for key, v in raw.items()]
        return "dict {" + ", ".join(parts) + "}"
    if isinstance(raw, (tuple, list)):
        first = raw[0] if raw else None
        return f"{type(raw).__name__} of {len(raw)}, first " + (f"tensor {tuple(first.shape)}"
                                                                if isinstance(first, torch.Tensor) else type(first).__name__)
    return type(raw).__name__
