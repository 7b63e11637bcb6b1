"""Member spec version 2: the input contract, class names, the TTA list, strict validation of hostile specs, the
contract applied identically in training and prediction and recorded in segens checkpoints; ``ens inspect``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import yaml
from conftest import flat
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover
from segens.errors import SegensError
from segens.members.input_contract import InputContract
from segens.members.kinds.smp import SmpMember
from segens.members.network import average_passes
from segens.members.spec import MemberSpec, load_spec, save_spec, spec_from_dict
from segens.store import quantize
from segens.synth import generate
from segens.training.augment import Augment
from segens.training.data import LabelledImages

BASE = {"name": "m", "kind": "smp", "model": {"architecture": "Unet", "encoder": "resnet18"}}
SMALL_UNET = {"architecture": "Unet", "encoder": "resnet18", "options": {"decoder_channels": [16, 16, 8, 8, 8]}}


def _write(path: Path, document: dict | str) -> Path:
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False))
    return path


# ---- reading and writing -----------------------------------------------------------------------------------------

def test_version_1_spec_reads_with_default_contract_and_writes_version_2(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", {"version": 1, **BASE, "input_size": 128, "tta": ["hflip"]})
    spec = load_spec(path)
    assert spec.input == InputContract(size=(128, 128)) and spec.input_size == (128, 128)
    save_spec(spec)
    document = yaml.safe_load(path.read_text())
    assert document["version"] == 2 and "input_size" not in document and "classes" not in document
    assert document["input"] == {"size": [128, 128], "channels": 3, "color": "gray", "scale": 255,
                                 "normalize": "none", "resize": "area"}
    assert load_spec(path).to_dict() == document


def test_full_contract_classes_and_tta_round_trip(tmp_path: Path) -> None:
    shuffled = list(reversed(CLASSES))
    document = {"version": 2, **BASE, "classes": shuffled,
                "input": {"size": [64, 96], "channels": 3, "color": "bgr", "scale": 1,
                          "normalize": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 50.0, 40.0]}, "resize": "nearest"},
                "tta": ["hflip", "vflip", {"scale": 0.5}, {"scale": 1.5}]}
    spec = load_spec(_write(tmp_path / "m.yaml", document))
    assert spec.input.mean_std == ((120.0, 110.0, 100.0), (60.0, 50.0, 40.0)) and spec.classes == shuffled
    written = spec.to_dict()
    assert written["input"]["normalize"] == document["input"]["normalize"] and written["classes"] == shuffled
    assert written["tta"] == document["tta"]
    assert spec_from_dict(written, "again").to_dict() == written


def test_in_channels_of_a_version_1_smp_spec_becomes_input_channels(tmp_path: Path) -> None:
    document = {"version": 1, **BASE, "input_size": 64, "model": {**BASE["model"], "in_channels": 1}}
    assert load_spec(_write(tmp_path / "m.yaml", document)).input.channels == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"input": {"normalize": "imagnet"}}, r"input\.normalize: .*none, imagenet or \{mean.*got 'imagnet'"),
    ({"input": {"color": "hsv"}}, r"input\.color.*'gray', 'rgb' or 'bgr'"),
    ({"input": {"normalize": {"mean": [0.5, 0.5], "std": [0.2, 0.2]}}}, r"normalize\.mean has 2 value\(s\) but channels is 3"),
    ({"input": {"channels": 1, "normalize": "imagenet"}}, "imagenet has 3 means"),
    ({"input": {"channels": 1, "color": "rgb"}}, "channels 1 needs color gray"),
    ({"input": {"resize": "cubic"}}, r"input\.resize"),
    ({"input": {"scale": 0}}, r"input\.scale"),
    ({"input": {"size": 100000}}, r"input\.size: .*each at most 8192, got 100000"),
    ({"input": {"size": [64, 64, 3]}}, r"input\.size"),
    ({"input_size": 64, "input": {"size": 128}}, r"input_size \[64, 64\] and input\.size \[128, 128\] disagree"),
    ({"tta": ["hflip", "rot90"]}, r"tta: .*entry 1 must be hflip, vflip or \{scale: s\}.*got 'rot90'"),
    ({"tta": [{"scale": 10}]}, r"entry 0 .* 0 < s <= 4, got \{'scale': 10\}"),
    ({"classes": [*CLASSES[:-1], "Femur"]}, "class name 'Femur' is not one of the competition's"),
    ({"classes": CLASSES[:-1]}, "class 'Ulna' is missing"),
    ({"classes": [*CLASSES, "Ulna"]}, "class name 'Ulna' appears more than once"),
    ({"kind": "keras"}, "unknown kind 'keras'; known kinds: arrays, csv, nnunet, smp, torch, yolo"),
    ({"name": "../../etc"}, r"member name '\.\./\.\./etc' is not a safe name"),
    ({"name": "a/b"}, "not a safe name"),
    ({"train": {"epochs": 0}}, "epochs must be a positive integer, got 0"),
    ({"train": {"batch_size": -2}}, "batch_size must be a positive integer"),
    ({"train": {"lr": float("nan")}}, "lr must be a finite number"),
    ({"model": {"options": {"x": float("inf")}}}, "options.x must be a finite number"),
    ({"surprise": 1}, "unknown field.*surprise"),
    ({"version": 3}, "spec version 3 is not known"),
    ({"input": {"size": "64"}}, r"input\.size"),
])
def test_bad_specs_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(SegensError, match=message) as error:
        load_spec(_write(tmp_path / "bad.yaml", {**BASE, **change}))
    assert "bad.yaml" in str(error.value)


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = _write(tmp_path / "bomb.yaml", "\n".join(["name: m", "kind: smp", "model:", *("  " + line for line in lines)]))
    with pytest.raises(SegensError, match="bomb.yaml: member spec expands to more than"):
        load_spec(path)


def test_cli_prints_a_bad_spec_without_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", {**BASE, "name": "../x"})
    result = subprocess.run([sys.executable, "-m", "segens.cli", "predict-member", str(path), "--split", "test",
                             "--data", str(tmp_path), "--out", str(tmp_path / "x.zarr")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "bad.yaml: member name '../x' is not a safe name" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.zarr").exists()


# ---- the contract's pixels ---------------------------------------------------------------------------------------

def test_default_contract_is_the_old_grayscale_input() -> None:
    image = np.random.default_rng(0).integers(0, 255, (150, 120), dtype=np.uint8)
    old = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    batch = InputContract(size=(64, 64)).batch([image])
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == torch.float32
    assert all(torch.equal(batch[0, channel], torch.from_numpy(old)) for channel in range(3))
    enlarged = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    assert torch.equal(InputContract(size=(256, 256)).batch([image])[0, 0], torch.from_numpy(enlarged))


def test_colour_contract_reads_bgr_or_rgb_and_normalizes_per_channel(tmp_path: Path) -> None:
    bgr = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    as_bgr = InputContract(size=(40, 50), color="bgr", normalize=(mean, std))
    as_rgb = InputContract(size=(40, 50), color="rgb", normalize=(mean, std))
    assert np.array_equal(as_bgr.read(tmp_path / "c.png"), bgr)
    assert np.array_equal(as_rgb.read(tmp_path / "c.png"), bgr[:, :, ::-1])
    x = torch.from_numpy(bgr).permute(2, 0, 1).float() / 255.0
    expected = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(as_bgr.batch([as_bgr.read(tmp_path / "c.png")])[0], expected)
    gray = InputContract(size=(40, 50), channels=1).batch([InputContract().read(tmp_path / "c.png")])
    assert gray.shape == (1, 1, 40, 50)


def test_training_items_are_made_by_the_same_contract_as_prediction(tmp_path: Path) -> None:
    generate(tmp_path / "data", n_train_patients=1, n_test_patients=0, size=96, seed=1)
    records = discover(tmp_path / "data", "train").records
    for contract in (InputContract(size=(64, 64)), InputContract(size=(64, 32), color="rgb", normalize="imagenet",
                                                                  resize="bilinear"),
                     InputContract(size=(32, 32), channels=1, scale=1, normalize=((100.0,), (50.0,)))):
        image, masks = LabelledImages(records, contract, Augment(None))[0]
        assert torch.equal(image, contract.batch([contract.read(records[0].image_path)])[0])
        assert masks.shape == (29, *contract.size)


# ---- TTA ---------------------------------------------------------------------------------------------------------

def test_tta_flips_and_scales_are_exact_in_the_fast_path(tmp_path: Path) -> None:
    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64), model=SMALL_UNET, path=tmp_path / "m.yaml",
                      tta=["hflip", "vflip", {"scale": 0.5}, {"scale": 1.5}],
                      train={"predict_batch_size": 1})  # a forward's values may depend on the batch it is in
    member = SmpMember(spec)
    torch.manual_seed(0)
    model = member.new_model().eval()
    member._models[0] = model
    images = [np.random.default_rng(i).integers(0, 255, shape, dtype=np.uint8)
              for i, shape in enumerate([(128, 128), (100, 150)])]
    for image, (values, _) in zip(images, member.predict_uint8(images, [0])):
        assert np.array_equal(values, quantize(member.predict([image], [0])[0]))
        # the definition: each pass at its own input size, flipped back, upsampled to the image, mean of sigmoids
        passes = []
        with torch.no_grad():
            for size, flip in (((64, 64), ()), ((64, 64), (-1,)), ((64, 64), (-2,)), ((32, 32), ()), ((96, 96), ())):
                x = spec.input.batch([image], size)
                passes.append(model(x.flip(flip) if flip else x)[0].flip(flip) if flip else model(x)[0])
        assert np.array_equal(values, quantize(average_passes(passes, *image.shape).numpy()))


# ---- recorded contract ---------------------------------------------------------------------------------------------

def test_segens_checkpoint_records_the_contract_and_a_contradicting_spec_is_an_error(tmp_path: Path) -> None:
    contract = InputContract(size=(64, 64), color="bgr", normalize="imagenet")
    trained = SmpMember(MemberSpec(name="m", kind="smp", model=SMALL_UNET, input=contract))
    torch.save(trained._checkpoint_payload(trained.new_model()), tmp_path / "best.pt")
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload["input"] == contract.to_dict() and payload["classes"] == list(CLASSES)
    same = SmpMember(MemberSpec(name="m", kind="smp", model=SMALL_UNET, input=contract, path=tmp_path / "m.yaml"))
    assert same.load(tmp_path / "best.pt").order is None
    other = InputContract(size=(64, 64), color="bgr")
    with pytest.raises(SegensError, match=r"m\.yaml: input\.normalize is 'none' but checkpoint .*best\.pt was trained "
                                          r"with input\.normalize 'imagenet'"):
        SmpMember(MemberSpec(name="m", kind="smp", model=SMALL_UNET, input=other, path=tmp_path / "m.yaml")).load(
            tmp_path / "best.pt")


def test_checkpoint_class_names_reorder_channels_and_contradicting_spec_classes_fail(tmp_path: Path) -> None:
    model = smp.Unet("resnet18", encoder_weights=None, classes=29, decoder_channels=(16, 16, 8, 8, 8))
    model.classes = list(reversed(CLASSES))  # a module that says its channel order
    torch.save(model, tmp_path / "whole.pt")
    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64), model=SMALL_UNET, path=tmp_path / "m.yaml")
    loaded = SmpMember(spec, trust_pickle=True).load(tmp_path / "whole.pt")
    assert loaded.order == list(range(28, -1, -1))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x).flip(1))
    spec.classes = list(CLASSES)
    with pytest.raises(SegensError, match="contradict the class names recorded in .*whole.pt"):
        SmpMember(spec, trust_pickle=True).load(tmp_path / "whole.pt")


def test_yolo_refuses_contract_fields_ultralytics_ignores() -> None:
    from segens.members.registry import factory

    for contract, message in ((InputContract(size=(64, 64), normalize="imagenet"), "input.normalize 'imagenet'"),
                              (InputContract(size=(64, 64), color="rgb"), "gray or bgr"),
                              (InputContract(size=(64, 64), resize="nearest"), "input.resize 'nearest'")):
        with pytest.raises(SegensError, match=message):
            factory("yolo")(MemberSpec(name="y", kind="yolo", input=contract))


# ---- ens inspect ---------------------------------------------------------------------------------------------------

def test_inspect_prints_what_a_spec_needs_and_writes_nothing(tmp_path: Path) -> None:
    contract = InputContract(size=(64, 64), color="bgr", normalize="imagenet")
    member = SmpMember(MemberSpec(name="m", kind="smp", model=SMALL_UNET, input=contract))
    torch.save(member._checkpoint_payload(member.new_model()), tmp_path / "best.pt")
    before = sorted(tmp_path.iterdir())
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "best.pt")])
    assert result.exit_code == 0, result.output
    for expected in ("segens smp checkpoint (version 2)", "architecture: Unet", "encoder: resnet18",
                     "output: tensor (1, 29, 64, 64)", "normalize: imagenet", "same order as the competition"):
        assert expected in flat(result.output)
    whole = smp.Unet("resnet18", encoder_weights=None, classes=29, decoder_channels=(16, 16, 8, 8, 8))
    whole.classes = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    torch.save(whole, tmp_path / "whole.pt")
    refused = CliRunner().invoke(app, ["inspect", str(tmp_path / "whole.pt")])
    assert refused.exit_code == 0 and "--trust-pickle" in flat(refused.output)
    trusted = CliRunner().invoke(app, ["inspect", str(tmp_path / "whole.pt"), "--trust-pickle"])
    assert "2 of 29 channels reordered by name" in flat(trusted.output)
    assert "model channel  1 ->  0 finger-1" in trusted.output
    spec = _write(tmp_path / "m.yaml", {**BASE, "model": SMALL_UNET, "input": contract.to_dict()})
    with_spec = CliRunner().invoke(app, ["inspect", str(tmp_path / "best.pt"), "--spec", str(spec)])
    assert with_spec.exit_code == 0 and "logits (1, 29, 64, 64)" in flat(with_spec.output)
    assert sorted(tmp_path.iterdir()) == sorted([*before, tmp_path / "whole.pt", tmp_path / "m.yaml"])


def test_training_refuses_a_foreign_class_order(tmp_path: Path) -> None:
    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64), model=SMALL_UNET, classes=list(reversed(CLASSES)),
                      path=tmp_path / "m.yaml")
    with pytest.raises(SegensError, match=r"m\.yaml: 'classes' gives the channel order of a checkpoint trained elsewhere"):
        SmpMember(spec).train_fold(0, [], [], tmp_path / "fold0", progress=False)
    assert not (tmp_path / "fold0").exists()


def test_a_size_error_reads_as_one_plain_message() -> None:
    from segens.members.spec import spec_from_dict

    with pytest.raises(SegensError, match=r"^x\.yaml: input\.size: must be a positive integer side or \[height, width\], "
                                          r"each at most 8192, got 0$"):
        spec_from_dict({"name": "a", "kind": "smp", "input": {"size": 0}}, "x.yaml")
