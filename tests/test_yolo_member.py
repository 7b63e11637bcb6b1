"""The yolo member: YOLO label files, the symlinked fold data set, spec checks, and (slow) a tiny trained model whose
soft masks reproduce ultralytics' own retina masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import square_polygons

from segens.conventions.classes import CLASSES
from segens.conventions.dataset import ImageRecord, discover
from segens.conventions.labels import write_label_json
from segens.errors import SegensError
from segens.members.registry import factory
from segens.members.spec import Checkpoint, MemberSpec
from segens.training.yolo_data import read_yolo_label, write_fold_dataset, yolo_label_text

SIZE = 128
TINY_TRAIN = {"epochs": 2, "batch": 2, "nbs": 2, "optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 0}


def _make_root(root: Path, count: int, size: int = SIZE) -> list[ImageRecord]:
    """``count`` images (two per patient) with one visible filled square per class, grey level by class."""
    for number in range(count):
        polygons = square_polygons(size, size, seed=number)
        image = np.full((size, size), 20, np.uint8)
        for index, name in enumerate(CLASSES):
            cv2.fillPoly(image, [polygons[name].reshape(-1, 1, 2)], 60 + 6 * index)
        stem = f"ID{number // 2 + 1:03d}/image{1661130828152 + number}"
        path = root / "train" / "DCM" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
        write_label_json(root / "train" / "outputs_json" / f"{stem}.json", polygons)
    return discover(root).records


def _spec(**changes) -> MemberSpec:
    fields = {"name": "yolo-tiny", "kind": "yolo", "input_size": (SIZE, SIZE), "model": {"conf": 0.0001},
              "train": dict(TINY_TRAIN)}
    return MemberSpec(**{**fields, **changes})


# ---- fast: label files, data set, spec checks ---------------------------------------------------------------

def test_yolo_label_round_trip(tmp_path: Path) -> None:
    height, width = 97, 131
    polygons = square_polygons(height, width, seed=3)
    polygons["Ulna"] = np.array([[0, 0], [131, 0], [131, 97], [5, 60], [0, 97]], dtype=np.int32)  # edges included
    path = tmp_path / "a.txt"
    path.write_text(yolo_label_text(polygons, height, width))
    lines = path.read_text().splitlines()
    assert len(lines) == len(CLASSES) and [int(line.split()[0]) for line in lines] == list(range(len(CLASSES)))
    assert all(0.0 <= float(value) <= 1.0 for line in lines for value in line.split()[1:])
    back = read_yolo_label(path, height, width)
    assert set(back) == set(CLASSES)
    for name, points in polygons.items():
        np.testing.assert_array_equal(np.rint(back[name]).astype(np.int32), points)


def test_read_yolo_label_rejects_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("29 0.1 0.1 0.2 0.2 0.3 0.3\n")
    with pytest.raises(SegensError, match="bad.txt: line 1"):
        read_yolo_label(path, 10, 10)


def test_fold_dataset_links_images_and_writes_labels(tiny_root: Path, tmp_path: Path) -> None:
    records = discover(tiny_root).records
    data_yaml = write_fold_dataset(records[:3], records[3:], tmp_path / "data")
    document = yaml.safe_load(data_yaml.read_text())
    assert list(document["names"].values()) == list(CLASSES)
    for split, split_records in (("train", records[:3]), ("val", records[3:])):
        listed = Path(document[split]).read_text().splitlines()
        assert len(listed) == len(split_records)
        for line, record in zip(listed, split_records):
            image = Path(line)
            assert image.is_symlink() and image.resolve() == record.image_path.resolve()
            assert image.name == record.key.replace("/", "__") + ".png"
            label = Path(line.replace("/images/", "/labels/")).with_suffix(".txt")  # ultralytics' rule
            polygons = read_yolo_label(label, 40, 48)
            assert set(polygons) == set(CLASSES)
    # a second call with another split keeps the links, drops what left the fold
    write_fold_dataset(records[:2], records[2:], tmp_path / "data")
    assert len(list((tmp_path / "data" / "train" / "images").iterdir())) == 2
    assert len(list((tmp_path / "data" / "val" / "labels").iterdir())) == 2
    assert not any(p.is_file() and not p.is_symlink() for p in (tmp_path / "data").rglob("*.png"))


def test_fold_dataset_needs_validation_images(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SegensError, match="validation"):
        write_fold_dataset(discover(tiny_root).records, [], tmp_path / "data")


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"config": "yolov8n-seg.yaml", "archi": 1}}, "unknown model field.*archi"),
    ({"train": {"epochs": 1, "lr": 0.1}}, "unknown train field.*lr"),
    ({"train": {"lr0": 0.1}}, "optimizer"),
    ({"input_size": (128, 256)}, "square"),
    ({"model": {"config": "yolov8n-seg.pt"}}, "model YAML"),
    ({"model": {"conf": 0}}, "conf"),
])
def test_spec_checks(changes: dict, message: str) -> None:
    with pytest.raises(SegensError, match=message):
        factory("yolo")(_spec(**changes))


def test_model_config_must_build_a_segmentation_model() -> None:
    with pytest.raises(SegensError, match="builds a detect model"):
        factory("yolo")(_spec(model={"config": "yolov8n.yaml"}))._new_model()
    with pytest.raises(SegensError, match="not found"):
        factory("yolo")(_spec(model={"config": "no-such-model.yaml"}))._new_model()


# ---- slow: one tiny model, trained once (interrupted after its first epoch, then resumed) ---------------------

class _Killed(Exception):
    """Stands for a training process killed between epochs."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(member, fold result, records, out_dir) of a 2-epoch model on 4 train / 2 val images of 128 px."""
    from ultralytics.engine.trainer import BaseTrainer

    tmp = tmp_path_factory.mktemp("yolo")
    records = _make_root(tmp / "root", 6)
    member = factory("yolo")(_spec())
    out_dir = tmp / "fold0"
    original = BaseTrainer.save_model

    def save_then_stop(self):  # a run killed right after saving its first epoch
        saved = original(self)
        if self.epoch == 0:
            raise _Killed("stopped after epoch 1")
        return saved

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BaseTrainer, "save_model", save_then_stop)
        with pytest.raises(_Killed):
            member.train_fold(0, records[:4], records[4:], out_dir, progress=False)
    assert (out_dir / "train" / "weights" / "last.pt").is_file()
    shutil.copy(out_dir / "train" / "weights" / "last.pt", tmp / "epoch1.pt")  # a second, different checkpoint
    with pytest.raises(SegensError, match="pickled state.*Pass --trust-pickle"):  # resuming unpickles last.pt
        member.train_fold(0, records[:4], records[4:], out_dir, progress=False)
    result = factory("yolo")(_spec(), trust_pickle=True).train_fold(0, records[:4], records[4:], out_dir,
                                                                     progress=False)
    return member, result, records, out_dir


@pytest.mark.slow
def test_training_resumes_and_loss_falls(trained) -> None:
    member, result, _, out_dir = trained
    assert [entry["epoch"] for entry in result.history] == [1, 2]  # epoch 2 came from the resumed run
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"seg_loss", "mask_map50_95"} <= set(result.history[0])
    assert result.checkpoint.path == out_dir / "train" / "weights" / "best.pt"
    assert 0.0 <= result.checkpoint.val_dice <= 1.0
    assert all(p.is_symlink() for p in (out_dir / "data" / "train" / "images").iterdir())
    args = yaml.safe_load((out_dir / "train" / "args.yaml").read_text())
    assert args["overlap_mask"] is False and args["imgsz"] == SIZE


@pytest.mark.slow
def test_finished_fold_is_returned_without_training(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    from ultralytics import YOLO

    member, result, records, out_dir = trained
    monkeypatch.setattr(YOLO, "train", lambda *a, **k: pytest.fail("a finished fold must not train again"))
    again = member.train_fold(0, records[:4], records[4:], out_dir, progress=False)
    assert again.checkpoint == result.checkpoint and again.history == result.history


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(128, 128), (188, 100), (97, 131), (61, 250)])
def test_soft_masks_match_ultralytics_retina_masks(trained, shape: tuple[int, int]) -> None:
    from ultralytics import YOLO

    from segens.members.kinds.yolo_masks import soft_predict

    member, result, records, _ = trained
    image = cv2.resize(cv2.imread(str(records[4].image_path), cv2.IMREAD_GRAYSCALE), shape[::-1])
    ours = soft_predict(member._model(result.checkpoint.path, trusted=True), image, imgsz=SIZE, conf=1e-4, iou=0.7,
                        keep_instances=True)
    stock = YOLO(str(result.checkpoint.path))
    (reference,) = stock.predict(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), imgsz=SIZE, conf=1e-4, iou=0.7,
                                 max_det=300, retina_masks=True, verbose=False)
    binary = ours.instances > 0.5
    kept = binary.any(axis=(1, 2))  # ultralytics drops instances whose mask is empty
    assert kept.sum() > 0
    np.testing.assert_array_equal(ours.boxes[kept], reference.boxes.data.numpy())
    np.testing.assert_array_equal(binary[kept], reference.masks.data.numpy().astype(bool))
    # class map = max over the class's instances of probability x confidence
    for cls in np.unique(ours.boxes[:, 5]).astype(int):
        rows = ours.boxes[:, 5] == cls
        expected = (ours.instances[rows] * ours.boxes[rows, 4, None, None]).max(axis=0)
        np.testing.assert_allclose(ours.class_maps[cls], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_predict_averages_folds_and_checks_checkpoints(trained, tmp_path: Path) -> None:
    """Two folds with different checkpoints (epoch 2 and epoch 1): the member's maps are the mean over folds of
    (plain pass + flipped-back flipped pass) / 2, each pass computed here from the checkpoint itself."""
    from ultralytics import YOLO

    from segens.members.kinds.yolo_masks import soft_predict
    from segens.members.spec import sha256_of

    member, result, records, out_dir = trained
    checkpoint = result.checkpoint
    epoch1 = out_dir.parent / "epoch1.pt"
    second = Checkpoint(epoch1, sha256_of(epoch1))
    assert second.sha256 != checkpoint.sha256
    spec = _spec(tta=["hflip"], checkpoints={0: checkpoint, 1: second})
    with pytest.raises(SegensError, match="ultralytics checkpoints are pickles.*--trust-pickle"):
        factory("yolo")(spec).predict([np.zeros((8, 8), np.uint8)], [0])
    adapter = factory("yolo")(spec, trust_pickle=True)
    image = cv2.resize(cv2.imread(str(records[5].image_path), cv2.IMREAD_GRAYSCALE), (90, 70))
    (two,) = adapter.predict([image], [0, 1])
    assert two.shape == (len(CLASSES), 70, 90) and two.dtype == np.float32

    def reference(path: Path) -> np.ndarray:
        model = YOLO(str(path))
        plain, flipped = (soft_predict(model, picture, imgsz=SIZE, conf=1e-4, iou=0.7, max_det=300).class_maps
                          for picture in (image, np.ascontiguousarray(image[:, ::-1])))
        return (plain + flipped[:, :, ::-1]) / 2

    fold0, fold1 = reference(checkpoint.path), reference(epoch1)
    # a barely trained YOLO's maps are small (mask x box confidence), so differences are measured relatively
    scale = max(fold0.max(), fold1.max())
    assert scale > 0 and np.abs(fold0 - fold1).max() > 0.1 * scale  # the folds really differ
    np.testing.assert_allclose(two, (fold0 + fold1) / 2, rtol=1e-5, atol=1e-6 * scale)
    (one,) = adapter.predict([image], [1])
    np.testing.assert_allclose(one, fold1, rtol=1e-5, atol=1e-6 * scale)
    assert len(adapter._models) == 2  # each checkpoint loaded once
    broken = factory("yolo")(_spec(checkpoints={0: Checkpoint(checkpoint.path, "0" * 64)}), trust_pickle=True)
    with pytest.raises(SegensError, match="best.pt: sha256 differs from the member spec's"):
        broken.predict([image], [0])
    with pytest.raises(SegensError, match="no checkpoint for fold 3"):
        adapter.predict([image], [3])
