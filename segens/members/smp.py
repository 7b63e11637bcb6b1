"""Members of kind ``smp``: any segmentation-models-pytorch architecture and encoder (UnetPlusPlus with vgg19
or tu-hrnet_w64 first of all) with a 29-channel sigmoid head: per-fold training and prediction.

Spec fields: ``model: {architecture: UnetPlusPlus, encoder: vgg19, encoder_weights: null, in_channels: 3,
options: {decoder_attention_type: scse}}`` (options: keyword arguments of the architecture);
``train: {epochs, batch_size, lr, weight_decay, optimizer: adam|adamw|lion, scheduler: none|plateau|cosine,
loss: {bce: 0.5, dice: 0.5}, augment: {hflip: 0.5, rotate: 15, clahe: 0.3, brightness_contrast: 0.2},
seed, workers}``. Checkpoints are a dict of the architecture fields and the state_dict (``format:
segens-smp``); a directory saved with smp's ``save_pretrained`` loads too, a whole pickled model only with
``trust_pickle``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import TextColumn

from segens.atomic import atomic_write, atomic_write_text
from segens.classes import NUM_CLASSES
from segens.dataset import ImageRecord, read_image, read_record_mask
from segens.dice import DiceTable, dice_per_class
from segens.errors import SegensError
from segens.folds.augment import Augment
from segens.folds.losses import WeightedLoss
from segens.folds.torchdata import LabelledImages, resize_image
from segens.members.base import FoldResult
from segens.members.postprocess import passes_to_uint8
from segens.members.registry import register
from segens.members.spec import Checkpoint, MemberSpec, sha256_of
from segens.progress import console, progress_bar

MODEL_FIELDS = ("architecture", "encoder", "encoder_weights", "in_channels", "options")
TRAIN_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "scheduler", "loss", "augment",
                "seed", "workers", "predict_batch_size")
OPTIMIZERS = ("adam", "adamw", "lion")
SCHEDULERS = ("none", "plateau", "cosine")
CHECKPOINT_FORMAT = "segens-smp"


def _check_fields(section: dict, allowed: Sequence[str], where: str, name: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise SegensError(f"{where}: unknown {name} field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


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


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward pass that returns a tensor, a dict with 'out', or a tuple/list (first item)."""
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def load_resume_state(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """A fold's last.pt with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts: nothing in
    it can run code); only with ``trust_pickle`` a file that needs a full unpickler (an older segens wrote some)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        if "Weights only load failed" not in str(exc):
            raise SegensError(f"{path}: cannot read this fold's resume state ({type(exc).__name__}); delete it to "
                              "train the fold from its first epoch") from None
        if not trust_pickle:
            raise SegensError(f"{path}: resume state holds pickled objects; loading it runs code stored in the file. "
                              "Pass --trust-pickle if you wrote it (an older segens did), or delete it to train the "
                              "fold from its first epoch") from None
        saved = torch.load(path, map_location="cpu", weights_only=False)
    needed = ("model", "optimizer", "rng", "epoch", "history", "best_dice")
    if not isinstance(saved, dict) or any(key not in saved for key in needed):
        raise SegensError(f"{path}: not a segens resume state (needs {', '.join(needed)}); delete it to train the "
                          "fold from its first epoch")
    return saved


@register("smp")
class SmpMember:
    """Adapter for smp models: builds, trains one fold at a time, loads checkpoints, predicts probabilities."""

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False) -> None:
        where = str(spec.path or spec.name)
        _check_fields(spec.model, MODEL_FIELDS, where, "model")
        _check_fields(spec.train, TRAIN_FIELDS, where, "train")
        for required in ("architecture", "encoder"):
            if required not in spec.model:
                raise SegensError(f"{where}: model.{required} is required for kind smp (e.g. UnetPlusPlus, vgg19)")
        if any(side % 32 for side in spec.input_size):
            raise SegensError(f"{where}: input_size {list(spec.input_size)} must be a multiple of 32 for smp models")
        self.spec = spec
        self.where = where
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.trust_pickle = trust_pickle
        self._models: dict[int, torch.nn.Module] = {}

    # ---- models and checkpoints -------------------------------------------------------------------------
    def new_model(self) -> torch.nn.Module:
        model = self.spec.model
        return build_model(model["architecture"], model["encoder"], model.get("encoder_weights"),
                           int(model.get("in_channels", 3)), model.get("options"), self.where)

    def load_checkpoint(self, path: Path) -> torch.nn.Module:
        """A model from a segens checkpoint, a state_dict, an smp ``save_pretrained`` folder or (trusted) a pickle."""
        path = Path(path)
        if not path.exists():
            raise SegensError(f"{path}: checkpoint not found (member {self.spec.name}); train it or fix the spec")
        if path.is_dir():
            import segmentation_models_pytorch as smp

            try:
                model = smp.from_pretrained(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure here is a bad checkpoint folder
                raise SegensError(f"{path}: not an smp save_pretrained folder ({exc})") from None
            return self._checked(model, path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            if "Weights only load failed" not in str(exc):
                raise SegensError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from None
            if not self.trust_pickle:
                raise SegensError(
                    f"{path}: holds a whole pickled model; loading it runs code stored in the file. Pass "
                    "--trust-pickle if you trust its source, or re-save it as a state_dict") from None
            return self._checked(torch.load(path, map_location="cpu", weights_only=False), path)
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            model = build_model(payload["architecture"], payload["encoder"], None, payload["in_channels"],
                                payload.get("options"), str(path))
            state = payload["state_dict"]
        elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
            model, state = self.new_model(), payload
        else:
            raise SegensError(f"{path}: neither a segens checkpoint nor a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            message = " ".join(line.strip() for line in str(exc).splitlines()[:2])[:300]
            raise SegensError(f"{path}: weights do not fit {self.spec.model.get('architecture')}/"
                              f"{self.spec.model.get('encoder')} with {NUM_CLASSES} classes ({message})") from None
        return self._checked(model, path)

    def _checked(self, model: torch.nn.Module, path: Path) -> torch.nn.Module:
        if not isinstance(model, torch.nn.Module):
            raise SegensError(f"{path}: did not load as a torch model")
        model.eval().to(self.device)
        size = self.spec.input_size
        in_channels = int(self.spec.model.get("in_channels", 3))
        with torch.no_grad():
            out = logits_of(model(torch.zeros(1, in_channels, *size, device=self.device)))
        if out.shape[1] != NUM_CLASSES:
            raise SegensError(f"{path}: the model outputs {out.shape[1]} channels, segens needs {NUM_CLASSES} (one per class)")
        return model

    def model_for(self, fold: int) -> torch.nn.Module:
        if fold not in self._models:
            self._models[fold] = self.load_checkpoint(self.spec.checkpoint(fold).path)
        return self._models[fold]

    # ---- prediction -------------------------------------------------------------------------------------
    def _batch_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = self.spec.input_size
        in_channels = int(self.spec.model.get("in_channels", 3))
        batch = np.stack([resize_image(image, size) for image in images]).astype(np.float32) / 255.0
        return torch.from_numpy(batch)[:, None].expand(-1, in_channels, -1, -1).to(self.device)

    def _forward(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, 29, h, w) in float32, averaged with the flipped pass when the spec asks for hflip TTA."""
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = logits_of(model(batch)).float()
            if "hflip" in self.spec.tta:
                flipped = logits_of(model(batch.flip(-1))).float().flip(-1)
                return torch.stack([logits, flipped])
        return logits[None]

    def pass_logits(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[list[torch.Tensor]]:
        """Per image, its (29, h, w) float32 CPU logits at the input size: fold by fold, then the flipped pass."""
        batch_size = int(self.spec.train.get("predict_batch_size", 4))
        passes: list[list[torch.Tensor]] = [[] for _ in images]
        for start in range(0, len(images), batch_size):
            tensor = self._batch_tensor(images[start : start + batch_size])
            for fold in folds:
                logits = self._forward(self.model_for(fold), tensor).cpu()  # (passes, N, 29, h, w)
                for index in range(logits.shape[1]):
                    passes[start + index].extend(logits[:, index])
        return passes

    def predict(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[np.ndarray]:
        """(H, W) uint8 images -> (29, H, W) float32 probabilities: each pass's logits upsampled bilinearly to
        the image's size, sigmoid, summed in pass order and divided by the pass count (probability space)."""
        results = []
        for image, passes in zip(images, self.pass_logits(images, folds)):
            total = None
            for logits in passes:
                term = torch.sigmoid(F.interpolate(logits[None], size=image.shape, mode="bilinear", align_corners=False)[0])
                total = term if total is None else total + term
            results.append((total / np.float32(len(passes))).numpy())
        return results

    def predict_uint8(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[tuple[np.ndarray, list]]:
        """The quantized ``predict`` (identical values) with per-class boxes, computed only where a class can be
        non-zero: the fast path for writing stores."""
        return [passes_to_uint8(passes, *image.shape, where=f"member {self.spec.name}")
                for image, passes in zip(images, self.pass_logits(images, folds))]

    # ---- training ---------------------------------------------------------------------------------------
    def train_fold(self, fold: int, train: Sequence[ImageRecord], val: Sequence[ImageRecord], out_dir: Path,
                   progress: bool = True) -> FoldResult:
        """Train one fold; keep best.pt by validation Dice, last.pt for resuming, history.json per epoch."""
        settings = self.spec.train
        epochs = int(settings.get("epochs", 30))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
        torch.manual_seed(int(settings.get("seed", 0)) + fold)
        model = self.new_model().to(self.device)
        optimizer = _optimizer(model, settings, self.where)
        scheduler = _scheduler(optimizer, settings, epochs, self.where)
        loss_fn = WeightedLoss(settings.get("loss"), self.where)
        state = {"epoch": 0, "history": [], "best_dice": -1.0}
        if last_path.exists():
            saved = load_resume_state(last_path, self.trust_pickle)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None and saved.get("scheduler"):
                scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["rng"])
            state = {key: saved[key] for key in state}
            if state["epoch"] < epochs:
                console.print(f"{self.spec.name} fold {fold}: resuming after epoch {state['epoch']}", markup=False)
        loader = torch.utils.data.DataLoader(
            LabelledImages(train, self.spec.input_size, Augment(settings.get("augment"), self.where),
                           int(self.spec.model.get("in_channels", 3))),
            batch_size=int(settings.get("batch_size", 2)), shuffle=True, num_workers=int(settings.get("workers", 0)),
            drop_last=len(train) > int(settings.get("batch_size", 2)),
        )
        for epoch in range(state["epoch"] + 1, epochs + 1):
            loss = self._train_epoch(model, loader, optimizer, loss_fn, f"fold {fold} epoch {epoch}/{epochs}", progress)
            val_dice = float(self.validate(model, val))  # a plain float: last.pt loads with weights_only=True
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_dice)
            elif scheduler is not None:
                scheduler.step()
            improved = val_dice > state["best_dice"]
            state["history"].append({"epoch": epoch, "loss": round(loss, 6), "val_dice": round(val_dice, 6),
                                     "lr": optimizer.param_groups[0]["lr"], "best": improved})
            if improved:
                state["best_dice"] = val_dice
                _save_atomic(self._checkpoint_payload(model), best_path)
            state["epoch"] = epoch
            _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict() if scheduler is not None else None,
                          "rng": torch.get_rng_state(), **state}, last_path)
            atomic_write_text(out_dir / "history.json", json.dumps(state["history"], indent=1))
            console.print(f"{self.spec.name} fold {fold}: epoch {epoch}/{epochs}  loss {loss:.4f}  "
                          f"val Dice {val_dice:.4f}{'  (best)' if improved else ''}", markup=False)
        return FoldResult(Checkpoint(best_path, sha256_of(best_path), state["best_dice"]), state["history"])

    def _checkpoint_payload(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "architecture": self.spec.model["architecture"],
                "encoder": self.spec.model["encoder"], "in_channels": int(self.spec.model.get("in_channels", 3)),
                "options": self.spec.model.get("options") or {},
                "classes": NUM_CLASSES, "input_size": list(self.spec.input_size),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

    def _train_epoch(self, model, loader, optimizer, loss_fn, label: str, progress: bool) -> float:
        model.train()
        total, count = 0.0, 0
        loss_column = TextColumn("loss {task.fields[loss]:.4f}")
        with progress_bar("batch", disable=not progress, extra=(loss_column,), transient=True) as bar:
            task = bar.add_task(label, total=len(loader), loss=float("nan"))
            for images, masks in loader:
                images, masks = images.to(self.device), masks.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(logits_of(model(images)), masks)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(images)
                count += len(images)
                bar.update(task, advance=1, loss=total / count)
        return total / max(count, 1)

    def validate(self, model: torch.nn.Module, val: Sequence[ImageRecord]) -> float:
        """The competition's Dice of ``model`` on ``val``: logits upsampled to each label's own size, p > 0.5."""
        model.eval()
        table = DiceTable()
        for record in val:
            image = read_image(record.image_path)
            logits = self._forward(model, self._batch_tensor([image]))[:, 0]
            upsampled = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
            pred = (torch.sigmoid(upsampled).mean(0) > 0.5).cpu().numpy()
            table.add(record.key, dice_per_class(pred, read_record_mask(record)))
        return table.mean() if table.scores else 0.0


def _optimizer(model: torch.nn.Module, settings: dict, where: str) -> torch.optim.Optimizer:
    name = str(settings.get("optimizer", "adamw")).lower()
    lr, weight_decay = float(settings.get("lr", 1e-3)), float(settings.get("weight_decay", 1e-4))
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "lion":
        from timm.optim import Lion

        return Lion(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise SegensError(f"{where}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _scheduler(optimizer: torch.optim.Optimizer, settings: dict, epochs: int, where: str):
    name = str(settings.get("scheduler", "none")).lower()
    if name == "none":
        return None
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise SegensError(f"{where}: unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
