"""Members of kind ``smp``: any segmentation-models-pytorch architecture and encoder (UnetPlusPlus with vgg19
or tu-hrnet_w64 first of all) with a 29-channel sigmoid head: per-fold training and prediction.

Spec fields: ``model: {architecture: UnetPlusPlus, encoder: vgg19, encoder_weights: null, in_channels: 3,
options: {decoder_attention_type: scse}}`` (options: keyword arguments of the architecture);
``train:`` as segens.training.settings describes (epochs or steps, batch_size, lr, optimizer, scheduler with
warmup, amp, cache, loss, augment, seed); training is the shared loop of segens.training.loop. Checkpoints are a
dict of the architecture fields, the class names, the input contract and the state_dict (``format: segens-smp``);
a directory saved with smp's ``save_pretrained`` loads too, a whole pickled model only with ``trust_pickle``.
Class names found in a checkpoint (or the spec's ``classes``) map its channels to the competition's classes; the
input contract and prediction are segens.members.network's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import ImageRecord, read_record_mask
from segens.conventions.dice import DiceTable, dice_per_class
from segens.errors import SegensError
from segens.infra.safeload import torch_load_data, torch_load_pickle
from segens.members.base import FoldResult
from segens.members.class_map import names_from
from segens.members.network import LoadedModel, TorchModuleMember, average_passes, load_weights, output_of
from segens.members.registry import register
from segens.members.spec import Checkpoint, MemberSpec, sha256_of
from segens.training.loop import NetworkRecipe, train_network_fold
from segens.training.pseudo import PseudoSource
from segens.training.settings import TRAIN_FIELDS, TrainSettings, parse_settings

MODEL_FIELDS = ("architecture", "encoder", "encoder_weights", "in_channels", "options")
CHECKPOINT_FORMAT = "segens-smp"


def build_model(architecture: str, encoder: str, encoder_weights: str | None = None, in_channels: int = 3,
                options: dict[str, Any] | None = None, where: str = "member spec") -> torch.nn.Module:
    """A fresh smp model with a 29-channel head (``options``: extra keyword arguments of the architecture,
    e.g. decoder_channels); an unknown architecture or encoder names the valid choices."""
    import segmentation_models_pytorch as smp

    architectures = {name.lower(): name for name in ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet",
                                                     "DeepLabV3", "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT")}
    if architecture.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise SegensError(f"{where}: unknown architecture {architecture!r}; choose from "
                          f"{', '.join(architectures.get(a, a) for a in smp.MODEL_ARCHITECTURES_MAPPING)}")
    if not encoder.startswith("tu-") and encoder not in smp.encoders.get_encoder_names():
        raise SegensError(f"{where}: unknown encoder {encoder!r}; choose from "
                          f"{', '.join(smp.encoders.get_encoder_names())}, or any timm model as 'tu-<name>'")
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder[3:]):
            raise SegensError(f"{where}: timm has no model {encoder[3:]!r} for encoder {encoder!r} "
                              "(e.g. tu-hrnet_w64, tu-hrnet_w18_small; see timm.list_models())")
    try:
        return smp.create_model(architecture, encoder_name=encoder, encoder_weights=encoder_weights,
                                in_channels=in_channels, classes=NUM_CLASSES, **(options or {}))
    except TypeError as exc:
        raise SegensError(f"{where}: bad model.options for {architecture}: {exc}") from None
    except (RuntimeError, OSError, ValueError) as exc:
        if encoder_weights:
            raise SegensError(f"{where}: encoder weights {encoder_weights!r} for {encoder} could not be loaded "
                              f"({exc}); nothing can be downloaded here: use encoder_weights: null or cache them") from None
        raise


def _module(model: Any, path: Path) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise SegensError(f"{path}: did not load as a torch model (got {type(model).__name__})")
    return model


def checkpoint_model(payload: dict[str, Any], path: Path) -> torch.nn.Module:
    """The model of a segens smp checkpoint, built from its recorded architecture and loaded with its weights; a
    SegensError naming ``path`` for a checkpoint that lacks a field or whose weights do not fit."""
    needed = ("architecture", "encoder", "in_channels", "state_dict")
    missing = [name for name in needed if name not in payload]
    if missing or not isinstance(payload["state_dict"], dict):
        raise SegensError(f"{path}: a segens checkpoint without {', '.join(missing) or 'a state_dict'}; it is "
                          "damaged: train the fold again or restore the file")
    model = build_model(payload["architecture"], payload["encoder"], None, payload["in_channels"],
                        payload.get("options"), str(path))
    return load_weights(model, payload["state_dict"], f"{path}: its weights do not fit its recorded "
                                                      f"{payload['architecture']}/{payload['encoder']}")


def recorded_input(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The input contract a segens checkpoint records (version 1 recorded only the size and channels)."""
    if isinstance(payload.get("input"), dict):
        return payload["input"]
    if payload.get("input_size") is not None:
        return {"size": list(payload["input_size"]), "channels": int(payload.get("in_channels", 3))}
    return None


def pretrained_class_names(folder: Path) -> list[str] | None:
    """Class names an smp ``save_pretrained`` folder's config.json carries (class_names, classes as a list, or
    Hugging Face's id2label), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("class_names", "classes", "id2label"):
        names = names_from(config.get(key))
        if names is not None:
            return names
    return None


@register("smp")
class SmpMember(TorchModuleMember):
    """Adapter for smp models: builds, trains one fold at a time, loads checkpoints; prediction is the shared
    network path (segens.members.network)."""

    model_fields = MODEL_FIELDS
    train_fields = TRAIN_FIELDS
    trains_with_pseudo = True

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        if any(side % 32 for side in spec.input.size):
            raise SegensError(f"{self.where}: input size {list(spec.input.size)} must be a multiple of 32 for smp models")

    def parse_model(self, section: dict[str, Any]) -> dict[str, Any]:
        """The architecture and encoder (both required); ``in_channels`` only as the input contract says."""
        for required in ("architecture", "encoder"):
            if required not in section:
                raise SegensError(f"{self.where}: model.{required} is required for kind smp (e.g. UnetPlusPlus, vgg19)")
        channels = self.spec.input.channels
        if int(section.get("in_channels", channels)) != channels:
            raise SegensError(f"{self.where}: model.in_channels {section['in_channels']} differs from input.channels "
                              f"{channels}; set input.channels only")
        return section

    def parse_train(self, section: dict[str, Any]) -> TrainSettings:
        return parse_settings(section, self.where, TRAIN_FIELDS)

    # ---- models and checkpoints -------------------------------------------------------------------------
    def new_model(self) -> torch.nn.Module:
        model = self.spec.model
        return build_model(model["architecture"], model["encoder"], model.get("encoder_weights"),
                           self.spec.input.channels, model.get("options"), self.where)

    def load(self, path: Path) -> LoadedModel:
        """A checked model with its class order (from the checkpoint's names or the spec's ``classes``)."""
        module, names = self._load(Path(path))
        order, names = self.class_order(names, Path(path))
        return self.checked(LoadedModel(module, order, names=names), Path(path))

    def load_checkpoint(self, path: Path) -> torch.nn.Module:
        """A model from a segens checkpoint, a state_dict, an smp ``save_pretrained`` folder or (trusted) a pickle."""
        return self.load(path).module

    def _load(self, path: Path) -> tuple[torch.nn.Module, list[str] | None]:
        """(model, class names it records or None); the recorded input contract is checked against the spec."""
        if not path.exists():
            raise SegensError(f"{path}: checkpoint not found (member {self.spec.name}); train it or fix the spec")
        if path.is_dir():
            import segmentation_models_pytorch as smp

            try:
                model = smp.from_pretrained(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure here is a bad checkpoint folder
                raise SegensError(f"{path}: not an smp save_pretrained folder ({exc})") from None
            return _module(model, path), pretrained_class_names(path)
        payload = torch_load_data(path, "torch checkpoint")
        if payload is None:
            if not self.trust_pickle:
                raise SegensError(
                    f"{path}: holds a whole pickled model; loading it runs code stored in the file. Pass "
                    "--trust-pickle if you trust its source, or re-save it as a state_dict")
            model = _module(torch_load_pickle(path, "checkpoint"), path)
            return model, names_from(getattr(model, "classes", None))
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            self.spec.input.check_recorded(recorded_input(payload), path, self.where)
            return checkpoint_model(payload, path), names_from(payload.get("classes"))
        if not (isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values())):
            raise SegensError(f"{path}: neither a segens checkpoint nor a state_dict")
        model = load_weights(self.new_model(), payload, f"{path}: weights do not fit "
                             f"{self.spec.model.get('architecture')}/{self.spec.model.get('encoder')} with "
                             f"{NUM_CLASSES} classes")
        return model, None

    def model_for(self, fold: int) -> LoadedModel:
        model = super().model_for(fold)
        if not isinstance(model, LoadedModel):  # a bare module put in the cache: the competition's order, logits
            model = self._models[fold] = LoadedModel(model)
        return model

    # ---- training ---------------------------------------------------------------------------------------
    def train_fold(self, fold: int, train: Sequence[ImageRecord], val: Sequence[ImageRecord], out_dir: Path,
                   progress: bool = True, pseudo: PseudoSource | None = None) -> FoldResult:
        """Train one fold with the shared loop (segens.training.loop): best.pt by validation Dice, last.pt for
        resuming, history.json per epoch; the checkpoint's Dice is best.pt's at each image's original size.
        ``pseudo``: pseudo-labelled images added to ``train``, their ignored pixels left out of the loss."""
        if self.spec.classes is not None and list(self.spec.classes) != list(CLASSES):
            raise SegensError(f"{self.where}: 'classes' gives the channel order of a checkpoint trained elsewhere; "
                              "segens trains in the competition's order: remove 'classes' to train this member")
        recipe = NetworkRecipe(self.spec.name, self.where, self.spec.input, self.new_model, self._checkpoint_payload,
                               score=lambda path: self.validate(self.load(path).module, val),
                               logits=lambda output: output_of(output, None, self.where))
        trained = train_network_fold(recipe, self.train_settings, fold, train, val, Path(out_dir), self.device, progress,
                                     self.trust_pickle, pseudo=pseudo)
        return FoldResult(Checkpoint(trained.best_path, sha256_of(trained.best_path), trained.val_dice),
                          trained.history)

    def _checkpoint_payload(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": 2, "architecture": self.spec.model["architecture"],
                "encoder": self.spec.model["encoder"], "in_channels": self.spec.input.channels,
                "options": self.spec.model.get("options") or {},
                "classes": list(CLASSES), "input": self.spec.input.to_dict(),
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}

    def validate(self, model: torch.nn.Module, val: Sequence[ImageRecord]) -> float:
        """The competition's Dice of ``model`` on ``val``: the prediction path's probabilities (input contract,
        TTA) at each label's own size, p > 0.5."""
        model.eval()
        table = DiceTable()
        for record in val:
            image = self.read_image(record.image_path)
            (passes,) = self.model_passes(LoadedModel(model), [image])
            pred = (average_passes(passes, *image.shape[:2]) > 0.5).numpy()
            table.add(record.key, dice_per_class(pred, read_record_mask(record)))
        return table.mean() if table.scores else 0.0

