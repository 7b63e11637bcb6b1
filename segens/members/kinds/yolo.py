"""Member kind ``yolo``: ultralytics YOLOv8-seg, trained from its model YAML (no downloaded weights), predicting
soft (29, H, W) probability maps.

```yaml
kind: yolo
input: {size: 640, color: gray}  # square side the images are letterboxed to; gray or bgr (see below)
classes: [...]                   # optional: the model's class order, if its names are not the competition's
tta: [hflip, vflip, {scale: 1.25}]   # optional: passes averaged in probability space
model: {config: yolov8n-seg.yaml, conf: 0.01, iou: 0.7, max_det: 300}   # the defaults
train: {epochs: 50, batch: 8, seed: 0, patience: 100, optimizer: AdamW, lr0: 0.001}
```

Ultralytics only returns binary masks. A class's probability here is the maximum over its kept instances of
``sigmoid(mask logit) * box confidence``, computed at the image's original size with the same upsampling as
ultralytics' ``retina_masks=True`` (so ``sigmoid > 0.5`` is exactly its mask). Training uses
``overlap_mask=False``: ultralytics' default paints instance masks over one another and loses multi-label pixels.

Input contract: ultralytics letterboxes, scales by 255 and normalizes nothing itself, so a spec's ``input`` may
only set ``size`` (square, a multiple of 32) and ``color``: ``gray`` (the grayscale image, as BGR) or ``bgr`` (the
PNG as ``cv2.imread`` reads it, which is what ultralytics trains on; the same for grayscale PNGs). The model's
class names (``model.names``, or the spec's ``classes``) map its classes to the competition's by name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no network checks or downloads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import LOGGER  # noqa: E402
from ultralytics.utils.patches import torch_load  # noqa: E402

from segens.conventions.classes import NUM_CLASSES  # noqa: E402
from segens.conventions.dataset import ImageRecord, read_record_mask  # noqa: E402
from segens.conventions.dice import DiceTable, dice_per_class  # noqa: E402
from segens.errors import SegensError  # noqa: E402
from segens.infra.atomic import atomic_write_text  # noqa: E402
from segens.members.base import CheckpointReport, FoldResult, NetworkMember  # noqa: E402
from segens.members.class_map import channel_order, names_from  # noqa: E402
from segens.members.input_contract import InputContract  # noqa: E402
from segens.members.kinds.yolo_masks import soft_predict  # noqa: E402
from segens.members.registry import register  # noqa: E402
from segens.members.spec import Checkpoint, MemberSpec, sha256_of  # noqa: E402
from segens.members.tta import mean_in_order, tta_passes  # noqa: E402
from segens.training.yolo_data import write_fold_dataset  # noqa: E402

MODEL_DEFAULTS: dict[str, Any] = {"config": "yolov8n-seg.yaml", "conf": 0.01, "iou": 0.7, "max_det": 300}
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 50, "batch": 8, "seed": 0}
# Ultralytics training arguments a spec may set, under ultralytics' own names (its defaults apply when absent).
# val: false validates only after the last epoch (best.pt is then the last model), saving a validation per epoch.
# nbs: ultralytics accumulates gradients up to a nominal batch of 64 images, so a tiny data set takes no optimizer
# step at all after warmup unless nbs is lowered to the batch size.
TRAIN_FIELDS = ("epochs", "batch", "lr0", "lrf", "optimizer", "seed", "patience", "nbs", "warmup_epochs",
                "cos_lr", "weight_decay", "momentum", "close_mosaic", "mosaic", "fliplr", "scale", "translate",
                "degrees", "hsv_v", "val", "pseudo")
# pseudo: accepted only to be refused with the reason (YoloMember.cannot_pseudo), not as an unknown field
RUN_NAME = "train"  # ultralytics run folder inside out_dir: out_dir/train/weights/{best,last}.pt
DONE_FILE = "segens_fold.json"  # written after the validation Dice; a finished fold is returned from it


def read_history(results_csv: str | Path) -> list[dict]:
    """Per-epoch dicts from ultralytics' results.csv: epoch, loss (sum of training losses), each training loss,
    val_loss, mask_map50 and mask_map50_95 (the mask mAP of that epoch's validation)."""
    path = Path(results_csv)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [{key.strip(): float(value) for key, value in row.items() if key and value and value.strip()}
                for row in csv.DictReader(handle)]
    history = []
    for row in rows:
        train_losses = {key[len("train/"):]: value for key, value in row.items()
                        if key.startswith("train/") and key.endswith("_loss")}
        history.append({
            "epoch": int(row["epoch"]),
            "loss": sum(train_losses.values()),
            **train_losses,
            "val_loss": sum(value for key, value in row.items() if key.startswith("val/") and key.endswith("_loss")),
            "mask_map50": row.get("metrics/mAP50(M)"),
            "mask_map50_95": row.get("metrics/mAP50-95(M)"),
        })
    return history


def checkpoint_state(last: Path) -> str:
    """``"missing"``, ``"resumable"`` (epoch and optimizer state kept) or ``"finished"`` (ultralytics strips the
    optimizer from last.pt when a run ends, early stop included). Unpickles ``last``: call it only for a trusted
    file."""
    if not last.is_file():
        return "missing"
    try:
        ckpt = torch_load(last, map_location="cpu", weights_only=False)
    except Exception as exc:  # a half-written file from a killed run among others
        raise SegensError(f"{last}: cannot load ({exc}); delete it to start this fold again") from None
    resumable = ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None
    return "resumable" if resumable else "finished"


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence ultralytics' INFO lines while ``enabled``."""
    level = LOGGER.level
    if enabled:
        LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def _keys_digest(records: Sequence[ImageRecord]) -> str:
    return hashlib.sha256("\n".join(sorted(r.key for r in records)).encode()).hexdigest()


@register("yolo")
class YoloMember(NetworkMember):
    """The ``yolo`` kind's adapter. Loaded checkpoints are cached per object.

    Ultralytics checkpoints are pickles (loading one runs code stored in it): the spec's checkpoints load only with
    ``trust_pickle``; a fold's own best.pt, just trained, is scored without it."""

    model_fields = tuple(MODEL_DEFAULTS)
    train_fields = TRAIN_FIELDS
    cannot_pseudo = ("ultralytics' segmentation loss has no per-pixel, per-class weights, so a pseudo-label's ignore "
                     "mask could not be honoured; train an smp member with pseudo-labels, or this one without them")

    def __init__(self, spec: MemberSpec, device: str = "cpu", trust_pickle: bool = False,
                 trust_code: bool = False) -> None:
        super().__init__(spec, device, trust_pickle, trust_code)
        self.device = _device(device)
        self.imgsz = _square_size(spec.input.size, self.where)
        _check_contract(spec.input, self.where)
        self.passes = tta_passes(spec.tta)
        _check_settings(self.model_settings, self.train_settings, self.where)
        self._models: dict[tuple[str, int, int], YOLO] = {}

    def parse_model(self, section: dict[str, Any]) -> dict[str, Any]:
        return {**MODEL_DEFAULTS, **section}

    def parse_train(self, section: dict[str, Any]) -> dict[str, Any]:
        if "pseudo" in section:
            raise SegensError(f"{self.where}: train.pseudo: kind yolo cannot train with pseudo-labels: "
                              f"{self.cannot_pseudo}")
        return {**TRAIN_DEFAULTS, **section}

    # ---- training -------------------------------------------------------------------------------------------

    def train_fold(self, fold: int, train: Sequence[ImageRecord], val: Sequence[ImageRecord], out_dir: Path,
                   progress: bool = True) -> FoldResult:
        """Train one fold into ``out_dir/train`` (resuming an unfinished run, skipping a finished one), then score
        best.pt on ``val`` with the competition's Dice. The checkpoint path is ``out_dir/train/weights/best.pt``."""
        out_dir = Path(out_dir).resolve()
        run_dir = out_dir / RUN_NAME
        best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
        done = self._finished_result(out_dir, best, val)
        if done is not None:
            return done
        if last.exists() and not self.trust_pickle:
            raise SegensError(f"{last}: resuming a YOLO fold loads ultralytics' pickled state, which runs code stored "
                              "in the file. Pass --trust-pickle if you trust that folder (your own interrupted run), "
                              f"or delete {run_dir} to train the fold from its first epoch")
        state = checkpoint_state(last)
        if state != "finished":
            data_yaml = write_fold_dataset(train, val, out_dir / "data")
            with _quiet(not progress):
                if state == "resumable":
                    YOLO(str(last)).train(resume=True, device=self.device, workers=0, plots=False)
                else:
                    self._new_model().train(**self._train_arguments(data_yaml, out_dir, progress))
        if not best.is_file():
            raise SegensError(f"{run_dir}: training ended without best.pt; see ultralytics' output above")
        # best.pt is trusted here: trained by this process, or from a folder the user trusted with --trust-pickle
        checkpoint = Checkpoint(best, sha256_of(best), self.validation_dice(best, val))
        atomic_write_text(out_dir / DONE_FILE, json.dumps(
            {"fold": fold, "sha256": checkpoint.sha256, "val_dice": checkpoint.val_dice, "val_keys": _keys_digest(val)}))
        return FoldResult(checkpoint, read_history(run_dir / "results.csv"))

    def validation_dice(self, checkpoint: Path, val: Sequence[ImageRecord]) -> float:
        """The competition's mean Dice of one checkpoint on labelled records (probabilities > 0.5, spec TTA)."""
        table = DiceTable()
        for record in val:
            probabilities = self._predict_checkpoint(Path(checkpoint), self.read_image(record.image_path), trusted=True)
            table.add(record.key, dice_per_class(probabilities > 0.5, read_record_mask(record)))
        return table.mean()

    def _finished_result(self, out_dir: Path, best: Path, val: Sequence[ImageRecord]) -> FoldResult | None:
        """The result of a fold finished earlier (best.pt unchanged since its Dice was computed on the same val
        images), or None."""
        done = out_dir / DONE_FILE
        if not done.is_file() or not best.is_file():
            return None
        try:
            record = json.loads(done.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        sha256 = sha256_of(best)
        if record.get("sha256") != sha256 or record.get("val_keys") != _keys_digest(val):
            return None
        return FoldResult(Checkpoint(best, sha256, record.get("val_dice")),
                          read_history(out_dir / RUN_NAME / "results.csv"))

    def _new_model(self) -> YOLO:
        """An untrained segmentation model built from the configured model YAML."""
        config = str(self.model_settings["config"])
        where = self.spec.path or self.spec.name
        try:
            model = YOLO(config)
        except (FileNotFoundError, OSError) as exc:
            raise SegensError(f"{where}: model config {config!r} not found ({exc}); "
                              "use an ultralytics model YAML such as yolov8n-seg.yaml or a path to one") from None
        if model.task != "segment":
            raise SegensError(f"{where}: model config {config!r} builds a {model.task} model; "
                              "use a segmentation YAML (a -seg config such as yolov8n-seg.yaml)")
        return model

    def _train_arguments(self, data_yaml: Path, out_dir: Path, progress: bool) -> dict[str, Any]:
        return {**self.train_settings, "data": str(data_yaml), "imgsz": self.imgsz, "overlap_mask": False,
                "plots": False, "amp": False, "device": self.device, "workers": 0, "project": str(out_dir),
                "name": RUN_NAME, "exist_ok": True, "pretrained": False, "deterministic": True, "verbose": progress}

    # ---- prediction -----------------------------------------------------------------------------------------

    def predict(self, images: Sequence[np.ndarray], folds: Sequence[int]) -> list[np.ndarray]:
        """(H, W) or (H, W, 3) uint8 images -> (29, H, W) float32 probabilities in [0, 1], averaged over the folds' checkpoints
        (each checked against its sha256 when first loaded)."""
        if not folds:
            raise SegensError(f"{self.spec.path or self.spec.name}: predict needs at least one fold")
        checkpoints = [self.spec.checkpoint(fold) for fold in folds]
        return [mean_in_order(self._predict_checkpoint(checkpoint.path, image, sha256=checkpoint.sha256)
                              for checkpoint in checkpoints) for image in images]

    def model_for(self, fold: int) -> YOLO:
        checkpoint = self.spec.checkpoint(fold)
        return self._model(checkpoint.path, checkpoint.sha256)

    def _predict_checkpoint(self, path: Path, image: np.ndarray, sha256: str | None = None,
                            trusted: bool = False) -> np.ndarray:
        """(29, H, W) float32 probabilities of one checkpoint in the competition's class order, the spec's TTA
        passes (flips, scaled letterbox sizes) summed in order and divided by their count."""
        model = self._model(path, sha256, trusted)
        order, _ = self._class_order(model, path)
        maps = mean_in_order(tta.flip(self._soft(model, np.ascontiguousarray(tta.flip(image, rows=0, cols=1)),
                                                 tta.input_size((self.imgsz, self.imgsz), 32)[0]))
                             for tta in self.passes)
        if order is not None:
            maps = maps[order]
        return np.ascontiguousarray(maps, dtype=np.float32)

    def describe(self, path: Path) -> CheckpointReport:
        """The checkpoint loaded as prediction loads it (a pickle: only with ``trust_pickle``)."""
        report = CheckpointReport.of_spec(path, self.spec)
        model = self._model(path)
        _, names = self._class_order(model, path)
        report.set_class_names(names)
        report.parameters = sum(p.numel() for p in model.model.parameters())
        report.output = f"ultralytics {model.task} model, {len(model.names)} classes"
        report.spec = self.spec.to_dict()
        return report

    def _class_order(self, model: YOLO, path: Path) -> tuple[list[int] | None, list[str] | None]:
        """(competition class -> model class, names) from ``model.names`` or the spec's ``classes``."""
        names = names_from(model.names)
        if names is not None and names == [str(index) for index in range(len(names))]:
            names = None  # ultralytics' placeholder names for a data YAML without names
        return channel_order(self.spec.classes, names, self.spec.where, path)

    def _soft(self, model: YOLO, image: np.ndarray, imgsz: int | None = None) -> np.ndarray:
        result = soft_predict(model, image, imgsz=imgsz or self.imgsz, conf=float(self.model_settings["conf"]),
                              iou=float(self.model_settings["iou"]), max_det=int(self.model_settings["max_det"]),
                              device=self.device)
        return result.class_maps

    def _model(self, path: Path, sha256: str | None = None, trusted: bool = False) -> YOLO:
        """A loaded checkpoint (checked against ``sha256`` if given), cached by path, size and modification time."""
        path = Path(path).resolve()
        if not path.is_file():
            raise SegensError(f"{path}: checkpoint not found; train it with `ens train-member` or fix the spec")
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._models:
            if not (trusted or self.trust_pickle):
                raise SegensError(f"{path}: ultralytics checkpoints are pickles; loading one runs code stored in the "
                                  "file. Pass --trust-pickle if you trust its source (e.g. you trained it)")
            if sha256 is not None and sha256_of(path) != sha256:
                raise SegensError(f"{path}: sha256 differs from the member spec's; the file changed since training "
                                  "(retrain the fold or restore the file)")
            model = YOLO(str(path))
            if model.task != "segment" or len(model.names) != NUM_CLASSES:
                raise SegensError(f"{path}: not a {NUM_CLASSES}-class segmentation model (task {model.task}, "
                                  f"{len(model.names)} classes)")
            self._models = {k: m for k, m in self._models.items() if k[0] != key[0]}  # drop older versions
            self._models[key] = model
        return self._models[key]


def _device(device: str) -> str:
    """An ultralytics device string; ``auto`` is the first GPU if there is one, else the CPU."""
    if device == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    return device


def _check_settings(model: dict[str, Any], train: dict[str, Any], where: str) -> None:
    """SegensError for values ultralytics would reject or silently ignore."""
    for name in ("conf", "iou"):
        if not isinstance(model[name], (int, float)) or not 0 < model[name] <= 1:
            raise SegensError(f"{where}: model.{name} must be a number in (0, 1], got {model[name]!r}")
    if not isinstance(model["max_det"], int) or model["max_det"] < 1:
        raise SegensError(f"{where}: model.max_det must be a positive integer, got {model['max_det']!r}")
    if not str(model["config"]).endswith((".yaml", ".yml")):
        raise SegensError(f"{where}: model.config must be a model YAML (e.g. yolov8n-seg.yaml), got "
                          f"{model['config']!r}; weights are never downloaded")
    if "lr0" in train and str(train.get("optimizer", "auto")).lower() == "auto":
        raise SegensError(f"{where}: train.lr0 is ignored by ultralytics' optimizer 'auto'; "
                          "also set train.optimizer (SGD, AdamW, ...)")
    for name in ("epochs", "batch"):
        if not isinstance(train[name], int) or train[name] < 1:
            raise SegensError(f"{where}: train.{name} must be a positive integer, got {train[name]!r}")


def _check_contract(contract: InputContract, where: str) -> None:
    """SegensError for input contract fields that ultralytics' own preprocessing would silently ignore."""
    fixed = {"channels": 3, "scale": 255, "normalize": "none", "resize": "area"}
    given = contract.to_dict()
    for key, value in fixed.items():
        if given[key] != value:
            raise SegensError(f"{where}: kind yolo cannot use input.{key} {given[key]!r}: ultralytics letterboxes, "
                              f"divides by 255 and does not normalize; leave input.{key} out (it is {value!r})")
    if contract.color not in ("gray", "bgr"):
        raise SegensError(f"{where}: kind yolo takes input.color gray or bgr (ultralytics reads BGR and makes RGB "
                          f"itself), got {contract.color!r}")


def _square_size(size: tuple[int, int], where: str) -> int:
    """The square side YOLO letterboxes to; a SegensError for a non-square input_size."""
    if size[0] != size[1]:
        raise SegensError(f"{where}: kind yolo trains on square inputs; set input.size to one integer "
                          f"(got {list(size)})")
    if size[0] % 32:
        raise SegensError(f"{where}: kind yolo needs input.size to be a multiple of 32 (got {size[0]})")
    return int(size[0])
