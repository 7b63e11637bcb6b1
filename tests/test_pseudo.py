"""ens pseudo-label and training with pseudo-labels: the label files read back through segens' reader and
rasterise to the ensemble's masks outside the ignored pixels; a filtered class has no annotation and is ignored
whole; ignored pixels provably never reach the loss; a pseudo image never lands in a validation fold; bad inputs
are clear errors; the bench's quick mode runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_search import member_maps
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.labels import parse_label_json, read_label_mask
from segens.ensemble.combine import combine
from segens.ensemble.pseudo import pseudo_label, single_polygon
from segens.store.pseudo_folder import load_pseudo
from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.search.run import search_weights
from segens.store import create_store, open_store
from segens.synth import generate
from segens.training.losses import WeightedLoss
from segens.training.pseudo import IGNORE

MISSED = "Trapezoid"  # two members of three miss it on the first test image: qc flags it, it is filtered
STRAY = "Lunate"      # every member adds a second piece on the second test image: it is ignored, not learnt
MEMBERS = {"a": (1.0, 0.2), "b": (1.1, 0.25), "c": (0.9, 0.3)}  # blur, noise


def _stores(root: Path, base: Path, split: str, rng: np.random.Generator) -> list[Path]:
    records = discover(root, "train" if split == "oof" else "test").records
    paths = []
    for name, (blur, noise) in MEMBERS.items():
        path = base / "stores" / f"{name}.{split}.zarr"
        store = create_store(path, name, "smp", split, {"name": name},
                             {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}}, images=[r.key for r in records])
        for number, record in enumerate(records):
            truth = read_record_mask(record)
            maps = member_maps(truth, rng, blur, noise)
            if split == "test" and number == 0 and name in ("a", "b"):
                maps[CLASSES.index(MISSED)] = 0
            if split == "test" and number == 1:
                maps[CLASSES.index(STRAY), 2:5, 2:5] = 240
            store.write_image(record.key, maps)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A synthetic data root (5 train patients, 2 test patients, 96 px), folds, three members' OOF and test stores
    made from the labels, a soft recipe searched on OOF."""
    base = tmp_path_factory.mktemp("pseudo")
    generate(base / "data", n_train_patients=5, n_test_patients=2, size=96, seed=5)
    folds, _ = make_folds(base / "data", k=2, seed=0)
    save_folds(folds, base / "folds.json")
    rng = np.random.default_rng(3)
    oof = _stores(base / "data", base, "oof", rng)
    _stores(base / "data", base, "test", rng)
    search_weights(oof, base / "data", None, base / "recipe.json", strategy="soft", postprocess=False,
                   progress=False)  # no post-processing: the stray piece stays in the ensemble's mask
    return base


def _test_stores(base: Path) -> list[str]:
    return [str(base / "stores" / f"{name}.test.zarr") for name in MEMBERS]


@pytest.fixture(scope="module")
def labelled(project: Path) -> Path:
    out = project / "pseudo"
    pseudo_label(_test_stores(project), project / "recipe.json", project / "data", out, progress=False)
    return out


def _ensemble_masks(project: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The ensemble's masks as `ens combine --masks-out` writes them with the recipe: key -> (29, H, W) bool."""
    combine(_test_stores(project), tmp_path / "sub.csv", recipe_path=project / "recipe.json",
            masks_out=tmp_path / "masks.zarr", progress=False)
    store = open_store(tmp_path / "masks.zarr")
    return {key: store.read(key) > 0 for key in store.keys()}


# ---- the labels ----------------------------------------------------------------------------------------------

def test_labels_read_back_and_rasterise_to_the_ensemble_masks(project: Path, labelled: Path, tmp_path: Path) -> None:
    masks = _ensemble_masks(project, tmp_path)
    folder = load_pseudo(labelled)
    records = discover(labelled, "train").records  # the folder is a data root segens' reader accepts
    assert [r.key for r in records] == sorted(masks) and [r.key for r in folder.records] == [r.key for r in records]
    rows = {(row["image"], row["class"]): row for row in _pairs(labelled)}
    compared = written = 0
    scores = []
    for record in records:
        assert record.image_path.read_bytes() == (project / "data" / "test" / "DCM" /
                                                  f"{record.key}.png").read_bytes()
        mask = masks[record.key]
        label = read_label_mask(record.label_path, *mask.shape[1:], require_all=False)
        ignored = folder.ignore(record.key)
        annotations = {a["label"]: a for a in json.loads(record.label_path.read_text())["annotations"]}
        for channel, name in enumerate(CLASSES):
            row = rows[(record.key, name)]
            if row["written"] == "0":
                assert name not in annotations and ignored[channel].all() and not label[channel].any()
                continue
            written += 1
            seen = ~ignored[channel]  # outside the ignored pixels the label IS the ensemble's mask
            assert np.array_equal(label[channel][seen], mask[channel][seen]), (record.key, name)
            assert annotations[name]["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-4)
            assert annotations[name]["qc_score"] == pytest.approx(float(row["qc_score"]), abs=1e-4)
            intersection = np.count_nonzero(label[channel] & mask[channel])
            dice = 2 * intersection / (np.count_nonzero(label[channel]) + np.count_nonzero(mask[channel]))
            scores.append(dice)
            if _simple(mask[channel]):  # one piece without holes: what one polygon holds
                assert dice > 0.99, (record.key, name, dice)
                compared += 1
    # the others differ by a stray pixel or a one-pixel hole of the noisy maps (1-5% of a bone at 96 px), all ignored
    assert compared > 40 and written - compared < 25 and np.mean(scores) > 0.98
    with pytest.raises(SegensError, match="classes missing"):  # the competition's reader still wants all 29
        parse_label_json(records[0].label_path)


def _simple(mask: np.ndarray) -> bool:
    """Whether a mask is one 8-connected piece without holes."""
    import cv2
    from scipy import ndimage

    pieces = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1
    return pieces == 1 and np.array_equal(ndimage.binary_fill_holes(mask), mask)


def _pairs(folder: Path) -> list[dict[str, str]]:
    import csv

    return list(csv.DictReader((folder / "pairs.csv").open()))


def test_a_filtered_class_has_no_annotation_and_is_ignored_whole(project: Path, labelled: Path) -> None:
    first = discover(project / "data", "test").records[0].key
    row = next(r for r in _pairs(labelled) if (r["image"], r["class"]) == (first, MISSED))
    assert row["written"] == "0" and row["reason"] in ("empty", "qc score", "confidence")
    label = labelled / "train" / "outputs_json" / f"{first}.json"
    assert MISSED not in parse_label_json(label, require_all=False)
    assert load_pseudo(labelled).ignore(first)[CLASSES.index(MISSED)].all()
    manifest = json.loads((labelled / "pseudo.json").read_text())
    rows = _pairs(labelled)
    assert manifest["version"] == 1 and manifest["counts"]["pairs"] == len(rows)
    assert manifest["counts"]["annotated"] == sum(r["written"] == "1" for r in rows)
    import hashlib

    assert manifest["recipe"]["sha256"] == hashlib.sha256((project / "recipe.json").read_bytes()).hexdigest()
    assert manifest["filters"] == {"max_qc_score": 0.4, "min_confidence": 0.7, "band": 0.2, "ignore": True}


def test_pixels_one_polygon_cannot_hold_are_ignored(project: Path, labelled: Path, tmp_path: Path) -> None:
    second = discover(project / "data", "test").records[1].key
    channel = CLASSES.index(STRAY)
    row = next(r for r in _pairs(labelled) if (r["image"], r["class"]) == (second, STRAY))
    ignored = load_pseudo(labelled).ignore(second)[channel]
    assert row["written"] == "1" and ignored[2:5, 2:5].all()  # the stray piece: in the mask, not in the polygon
    label = read_label_mask(labelled / "train" / "outputs_json" / f"{second}.json", *ignored.shape, False)
    assert not label[channel, 2:5, 2:5].any() and label[channel].any()
    assert not ignored.all()
    # a hole and a second piece, by hand
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False
    mask[15:18, 15:18] = True
    points, drawn = single_polygon(mask)
    assert points.shape[1] == 2 and len(points) >= 4
    assert np.array_equal(drawn != mask, (~mask & drawn) | (mask & ~drawn))
    assert drawn[5:8, 5:8].all() and not drawn[15:18, 15:18].any()  # the hole is filled, the other piece left out
    assert single_polygon(np.zeros((4, 4), bool))[0] is None


def test_unfiltered_without_ignore_writes_every_pair_with_a_polygon(project: Path, tmp_path: Path) -> None:
    summary = pseudo_label(_test_stores(project), project / "recipe.json", project / "data", tmp_path / "plain",
                           max_qc_score=1, min_confidence=0, ignore=False, progress=False)
    assert summary.counts["qc score"] == summary.counts["confidence"] == 0
    assert summary.counts["annotated"] + summary.counts["empty"] + summary.counts["no polygon"] == \
        summary.counts["pairs"]
    folder = load_pseudo(tmp_path / "plain")
    assert not any(folder.ignore(record.key).any() for record in folder.records)


def test_a_hard_vote_recipe_labels_with_vote_shares(project: Path, tmp_path: Path) -> None:
    """With hard votes the confidence is the mean vote share inside the mask (more than half: a strict majority
    kept each pixel) and the band is around the share needed."""
    oof = [project / "stores" / f"{name}.oof.zarr" for name in MEMBERS]
    search_weights(oof, project / "data", None, tmp_path / "hard.json", strategy="hard", postprocess=False,
                   progress=False)
    summary = pseudo_label(_test_stores(project), tmp_path / "hard.json", project / "data", tmp_path / "p",
                           min_confidence=0, progress=False, jobs=2)
    written = [row for row in summary.rows if row.written]
    assert len(written) > 60 and all(0.5 < row.confidence <= 1 for row in written)


# ---- bad inputs ----------------------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(project: Path, labelled: Path, tmp_path: Path) -> None:
    stores, recipe, data = _test_stores(project), project / "recipe.json", project / "data"
    with pytest.raises(SegensError, match=r"the recipe's members are a, b, c, the stores' are a, b"):
        pseudo_label(stores[:2], recipe, data, tmp_path / "p1", progress=False)
    with pytest.raises(SegensError, match=r"lies inside the data root"):
        pseudo_label(stores, recipe, data, data / "pseudo", progress=False)
    with pytest.raises(SegensError, match=r"pseudo-labels are for test images"):
        pseudo_label([s.replace(".test.", ".oof.") for s in stores], recipe, data, tmp_path / "p2", progress=False)
    with pytest.raises(SegensError, match=r"exists \(a folder\); pass --overwrite"):
        pseudo_label(stores, recipe, data, labelled, progress=False)
    with pytest.raises(SegensError, match=r"--min-confidence must be a number from 0 to 1"):
        pseudo_label(stores, recipe, data, tmp_path / "p3", min_confidence=1.5, progress=False)
    with pytest.raises(SegensError, match=r"no \(image, class\) pair passed the filters"):
        pseudo_label(stores, recipe, data, tmp_path / "p4", min_confidence=1.0, progress=False)
    assert not (tmp_path / "p4").exists() and not list(tmp_path.glob(".p4*"))  # nothing half-written left
    with pytest.raises(SegensError, match=r"pseudo\.json: not found"):
        load_pseudo(tmp_path)
    gone = tmp_path / "gone"  # a test image removed after the stores were predicted: named
    import shutil

    shutil.copytree(data, gone)
    first = discover(gone, "test").records[0]
    first.image_path.unlink()
    with pytest.raises(SegensError, match=rf"image '{first.key}' is not in the test split of .*gone; give the data root"):
        pseudo_label(stores, recipe, gone, tmp_path / "p5", progress=False)


# ---- the loss never sees ignored pixels ---------------------------------------------------------------------

def _loss_and_gradient(loss: WeightedLoss, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits = logits.clone().requires_grad_(True)
    value = loss(logits, targets)
    value.backward()
    return value.detach(), logits.grad


def test_ignored_pixels_do_not_reach_the_loss_or_its_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 12, 10, generator=generator) * 3
    targets = (torch.rand(2, NUM_CLASSES, 12, 10, generator=generator) > 0.6).float()
    ignored = torch.rand(2, NUM_CLASSES, 12, 10, generator=generator) > 0.7
    ignored[:, 3] = True  # a class ignored whole
    marked = torch.where(ignored, float(IGNORE), targets)
    loss = WeightedLoss({"bce": 0.3, "dice": 1.0, "iou": 0.5, "focal": 0.7}, ignore=IGNORE)
    value, gradient = _loss_and_gradient(loss, logits, marked)
    # other logits and other labels under the ignored pixels: the same loss and gradient, bit for bit
    changed_logits = torch.where(ignored, torch.randn(logits.shape, generator=generator) * 10, logits)
    again, gradient_again = _loss_and_gradient(loss, changed_logits, marked)
    assert torch.equal(value, again) and torch.equal(gradient, gradient_again)
    assert torch.count_nonzero(gradient[ignored]) == 0 and torch.count_nonzero(gradient[~ignored]) > 0
    # the masked loss with nothing ignored is the plain loss
    for name in ("bce", "dice", "iou", "focal"):
        plain, masked = WeightedLoss({name: 1.0}), WeightedLoss({name: 1.0}, ignore=IGNORE)
        assert torch.allclose(plain(logits, targets), masked(logits, targets), rtol=1e-5, atol=1e-6), name


class _Source:
    """A PseudoSource of one image of the project's pseudo folder, with a hand-made ignore mask."""

    def __init__(self, folder: Path, ignore: np.ndarray) -> None:
        self.records = load_pseudo(folder).records[:1]
        self._ignore = ignore

    def ignore(self, key: str) -> np.ndarray:
        return self._ignore

    def identity(self) -> dict:
        return {"recipe_sha256": "x"}


def test_labels_and_pixels_under_ignored_pixels_change_nothing_in_training(labelled: Path, monkeypatch) -> None:
    """Through the training data path (decode, augment, loss) into a network whose output pixel sees only its own
    input pixel (a 1x1 convolution): the labels under ignored pixels, and the image where every class is ignored,
    may be anything; the parameters' gradients are the same, bit for bit. (A real network's output pixels see
    their neighbours, so image values under ignored pixels move the gradient through the pixels that are kept:
    that is the image, not the label, and intended.)"""
    import segens.training.pseudo as pseudo_module
    from segens.members.input_contract import InputContract
    from segens.training.augment import Augment
    from segens.training.data import CachedImage, CachedImages
    from segens.training.pseudo import decode_pseudo

    record = load_pseudo(labelled).records[0]
    ignore = np.zeros((NUM_CLASSES, 96, 96), bool)
    ignore[:, 10:40, 20:60] = True  # every class
    ignore[5, 50:90, :] = True      # one class
    contract = InputContract(size=(96, 96), channels=1)
    item = decode_pseudo(record, ignore, contract)
    assert (item.masks[:, 10:40, 20:60] == IGNORE).all() and (item.masks[5, 50:90] == IGNORE).all()
    assert set(np.unique(item.masks[:, 40:50])) <= {0, 1} and item.masks[:, 40:50].any()

    labels = pseudo_module.record_masks_at

    def flipped_under_ignored(*args, **kwargs) -> np.ndarray:
        masks = labels(*args, **kwargs)
        masks[ignore] ^= 1  # other labels, only where they are ignored
        return masks

    monkeypatch.setattr(pseudo_module, "record_masks_at", flipped_under_ignored)
    other = decode_pseudo(record, ignore, contract)
    image = other.image.copy()
    image[10:40, 20:60] = 255 - image[10:40, 20:60]  # other pixels where every class is ignored
    changed = CachedImage(other.key, image, other.masks)

    def gradients(cached: CachedImage) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Conv2d(1, NUM_CLASSES, 1)
        dataset = CachedImages([cached], contract, Augment({"hflip": 0.5}))
        torch.manual_seed(1)
        pixels, masks = dataset[0]
        loss = WeightedLoss({"bce": 0.5, "dice": 1.0, "focal": 0.2}, ignore=IGNORE)(model(pixels[None]), masks[None])
        loss.backward()
        return [parameter.grad.clone() for parameter in model.parameters()]

    assert not np.array_equal(changed.image, item.image)
    for first, second in zip(gradients(item), gradients(changed)):
        assert torch.count_nonzero(first) > 0 and torch.equal(first, second)


# ---- training with pseudo-labels ----------------------------------------------------------------------------

SMALL_UNET = {"architecture": "Unet", "encoder": "resnet18", "options": {"decoder_channels": [16, 8, 8, 8, 8]}}


def _spec(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"name": "r18", "kind": "smp", "input": {"size": 32}, "model": SMALL_UNET,
                                    "train": {"steps": 1, "batch_size": 4, "seed": 0, **train}}))
    return path


def test_pseudo_images_train_every_fold_never_validate_and_are_recorded(project: Path, labelled: Path,
                                                                       tmp_path: Path, monkeypatch) -> None:
    import segens.training.loop as loop
    from segens.members.train import train_member

    seen = []
    real = loop.train_network_fold

    def spy(recipe, settings, fold, train, val, *args, pseudo=None, **kwargs):
        if pseudo is not None:
            seen.append((fold, [r.key for r in train], [r.key for r in val], [r.key for r in pseudo.records]))
        return real(recipe, settings, fold, train, val, *args, pseudo=pseudo, **kwargs)

    import segens.members.kinds.smp as smp_kind

    monkeypatch.setattr(smp_kind, "train_network_fold", spy)
    (tmp_path / "members").mkdir()
    spec = _spec(tmp_path / "members" / "m.yaml", pseudo="../pseudo")  # relative to the spec's folder
    (tmp_path / "pseudo").symlink_to(labelled)
    summaries = train_member(spec, project / "data", project / "folds.json", fold="all", progress=False)
    assert [s.fold for s in summaries] == [0, 1] and len(seen) == 2
    pseudo_keys = set(seen[0][3])
    assert pseudo_keys == {r.key for r in load_pseudo(labelled).records} and len(pseudo_keys) == 4
    for fold, train, val, pseudo in seen:
        assert not pseudo_keys & set(val) and not pseudo_keys & set(train) and set(pseudo) == pseudo_keys
    import hashlib

    recipe_sha = hashlib.sha256((project / "recipe.json").read_bytes()).hexdigest()
    for summary in summaries:
        best = torch.load(summary.checkpoint, map_location="cpu", weights_only=True)
        assert best["pseudo"]["recipe_sha256"] == recipe_sha and best["pseudo"]["images"] == 4
    last = torch.load(summaries[0].checkpoint.parent / "last.pt", map_location="cpu", weights_only=True)
    assert last["pseudo"]["recipe_sha256"] == recipe_sha
    from segens.members.inspect_checkpoint import inspect_checkpoint

    notes = inspect_checkpoint(summaries[0].checkpoint).notes  # `ens inspect` says so
    assert any("trained with 4 pseudo-labelled images" in note and recipe_sha in note for note in notes)

    # resuming a fold with other pseudo-labels (here: none) is refused; the command line names the folder too
    _spec(spec, steps=3)
    with pytest.raises(SegensError, match=r"last\.pt: this fold was started with the pseudo-labels of .* and is now "
                                          r"trained without pseudo-labels"):
        train_member(spec, project / "data", project / "folds.json", fold="0", progress=False)
    other = tmp_path / "other"
    pseudo_label(_test_stores(project), project / "recipe.json", project / "data", other, progress=False,
                 ignore=False)
    result = CliRunner().invoke(app, ["train-member", str(spec), "--data", str(project / "data"), "--folds",
                                      str(project / "folds.json"), "--fold", "0", "--pseudo", str(other)])
    assert result.exit_code == 1 and "is now trained with the pseudo-labels of " + str(other.resolve()) in \
        str(result.exception)


def test_pseudo_labels_of_training_images_or_for_yolo_are_refused(project: Path, labelled: Path,
                                                                  tmp_path: Path) -> None:
    from segens.members.spec import load_spec
    from segens.members.train import train_member

    spec = _spec(tmp_path / "m.yaml")
    fake = tmp_path / "fake"  # a pseudo folder whose images are the training images of the data root
    import shutil

    shutil.copytree(labelled, fake)
    shutil.rmtree(fake / "train" / "DCM")
    shutil.copytree(project / "data" / "test" / "DCM", fake / "train" / "DCM")
    root = tmp_path / "root"
    shutil.copytree(project / "data", root)
    shutil.copytree(project / "data" / "test", root / "train", dirs_exist_ok=True)
    folds, _ = make_folds(root, k=2, seed=0)
    save_folds(folds, tmp_path / "folds.json")
    with pytest.raises(SegensError, match=r"is pseudo-labelled and also a training image of .*: it could land in a "
                                          r"validation fold"):
        train_member(spec, root, tmp_path / "folds.json", progress=False, pseudo=fake)
    yolo = tmp_path / "y.yaml"
    yolo.write_text(yaml.safe_dump({"name": "y", "kind": "yolo", "input": {"size": 64},
                                    "train": {"epochs": 1, "pseudo": str(labelled)}}))
    with pytest.raises(SegensError, match=r"kind yolo cannot train with pseudo-labels: ultralytics' segmentation "
                                          r"loss has no per-pixel"):
        train_member(yolo, project / "data", project / "folds.json", progress=False)
    yolo.write_text(yaml.safe_dump({"name": "y", "kind": "yolo", "input": {"size": 64}, "train": {"epochs": 1}}))
    with pytest.raises(SegensError, match=r"y\.yaml: kind yolo cannot train with pseudo-labels \(.*\): "
                                          r"ultralytics' segmentation loss"):
        train_member(yolo, project / "data", project / "folds.json", progress=False, pseudo=labelled)
    assert load_spec(spec).train.get("pseudo") is None


# ---- the command and the benchmark --------------------------------------------------------------------------

def test_the_command_writes_the_folder_and_its_defaults_are_the_library_s(project: Path, tmp_path: Path) -> None:
    import segens.cli.pseudo_label as command
    from segens.ensemble import pseudo, qc

    assert (command.MAX_QC_SCORE, command.MIN_CONFIDENCE, command.BAND) == \
        (pseudo.MAX_QC_SCORE, pseudo.MIN_CONFIDENCE, qc.BAND)
    result = CliRunner().invoke(app, ["pseudo-label", *_test_stores(project), "--recipe", str(project / "recipe.json"),
                                      "--data", str(project / "data"), "--out", str(tmp_path / "p"),
                                      "--max-qc-score", "0.5", "--min-confidence", "0.6", "--band", "0.1"])
    assert result.exit_code == 0, result.output
    assert "of 4 images written" in " ".join(result.output.split())
    manifest = json.loads((tmp_path / "p" / "pseudo.json").read_text())
    assert manifest["filters"] == {"max_qc_score": 0.5, "min_confidence": 0.6, "band": 0.1, "ignore": True}
    assert {path.name for path in (tmp_path / "p").iterdir()} == {"train", "ignore.zarr", "pairs.csv", "qc.csv",
                                                                  "pseudo.json"}
    listed = [line.split()[1] for line in CliRunner().invoke(app, ["--help"]).output.splitlines()
              if line.startswith("│ ") and line[2] not in " -"]  # a command's first line, not an option
    assert listed.index("qc") + 1 == listed.index("pseudo-label") == listed.index("show") - 1


@pytest.mark.slow
def test_bench_quick_runs_every_variant(tmp_path: Path) -> None:
    """bench/pseudo.py --quick --budget both (about 30 s on 2 idle cores): the ensemble, both pseudo folders, the
    six variants scored on the test labels."""
    from bench import pseudo as bench

    report = bench.main(["--quick", "--budget", "both", "--workdir", str(tmp_path)])
    (result,) = report["results"]
    assert set(result["dice"]) == {"a", "b", "c", "a+", "b+", "c+"}
    assert all(0 <= d <= 1 for d in result["dice"].values())
    assert result["steps"] == {"steps": 1, "epochs": 2}  # 3 real images a fold and 2 test images: 1 x 5 / 3
    assert result["pseudo"]["b"]["ignored_share"] == 0 and result["pseudo"]["c"]["annotated"] > 0
    assert (tmp_path / "quick" / "pseudo_bench.json").is_file()
