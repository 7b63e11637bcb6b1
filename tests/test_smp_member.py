"""smp members: real models trained for a few steps on tiny synthetic images, checkpoints loaded back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import yaml
from conftest import flat
from typer.testing import CliRunner

from segens.cli import app
from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.members.kinds.smp import SmpMember
from segens.members.registry import factory
from segens.members.spec import MemberSpec, load_spec
from segens.synth import generate


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smp") / "data"
    generate(root, n_train_patients=3, n_test_patients=1, size=96, seed=1)
    return root


@pytest.fixture(scope="module")
def folds_file(small_root: Path) -> Path:
    folds, _ = make_folds(small_root, k=3, seed=0)
    path = small_root.parent / "folds.json"
    save_folds(folds, path)
    return path


def write_spec(path: Path, epochs: int, **model) -> Path:
    document = {"name": "unetpp-r18", "kind": "smp", "input_size": 64, "tta": ["hflip"],
                "model": {"architecture": "UnetPlusPlus", "encoder": "resnet18", **model},
                "train": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "optimizer": "adam", "seed": 0,
                          "loss": {"bce": 1.0, "dice": 1.0}, "augment": {"hflip": 0.5, "brightness_contrast": 0.1}}}
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_train_resume_and_predict(small_root: Path, folds_file: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path / "member.yaml", epochs=3)
    result = CliRunner().invoke(app, ["train-member", str(spec_path), "--data", str(small_root),
                                      "--folds", str(folds_file), "--fold", "0"])
    assert result.exit_code == 0, result.output
    assert "best val Dice" in flat(result.output)
    spec = load_spec(spec_path)
    checkpoint = spec.checkpoints[0]
    assert checkpoint.path.exists() and len(checkpoint.sha256) == 64
    history = json.loads((checkpoint.path.parent / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]  # the loss falls

    # an interrupted fold resumes: ask for more epochs and only the new ones run
    write_spec(spec_path, epochs=4)
    spec_doc = yaml.safe_load(spec_path.read_text())
    spec_doc["checkpoints"] = {0: {"path": str(checkpoint.path), "sha256": checkpoint.sha256}}
    spec_path.write_text(yaml.safe_dump(spec_doc))
    result = CliRunner().invoke(app, ["train-member", str(spec_path), "--data", str(small_root),
                                      "--folds", str(folds_file), "--fold", "0"])
    assert result.exit_code == 0, result.output
    history = json.loads((checkpoint.path.parent / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]

    member = factory("smp")(load_spec(spec_path))
    image = np.random.default_rng(0).integers(0, 255, (70, 90), dtype=np.uint8)  # non-square, not the input size
    (probabilities,) = member.predict([image], folds=[0])
    assert probabilities.shape == (29, 70, 90) and probabilities.dtype == np.float32
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


def _spec(tmp_path: Path, **model) -> MemberSpec:
    return MemberSpec(name="m", kind="smp", input_size=(64, 64), model={"architecture": "Unet", "encoder": "resnet18", **model},
                      path=tmp_path / "m.yaml")


@pytest.mark.parametrize("encoder", ["vgg19", "tu-hrnet_w18_small"])
def test_unetplusplus_encoders_load_from_state_dict_and_save_pretrained(tmp_path: Path, encoder: str) -> None:
    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64),
                      model={"architecture": "UnetPlusPlus", "encoder": encoder}, path=tmp_path / "m.yaml")
    member = SmpMember(spec)
    model = member.new_model()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    loaded = member.load_checkpoint(tmp_path / "state.pt")
    model.save_pretrained(str(tmp_path / "pretrained"))
    from_folder = member.load_checkpoint(tmp_path / "pretrained")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), from_folder(x), atol=1e-5)


def test_pickled_model_needs_trust(tmp_path: Path) -> None:
    model = smp.Unet("resnet18", encoder_weights=None, classes=29)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(SegensError, match="runs code"):
        SmpMember(_spec(tmp_path)).load_checkpoint(tmp_path / "whole.pt")
    assert SmpMember(_spec(tmp_path), trust_pickle=True).load_checkpoint(tmp_path / "whole.pt") is not None


class DictOutput(torch.nn.Module):
    """A model whose forward returns a dict, as torchvision-style segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = smp.Unet("resnet18", encoder_weights=None, classes=29)

    def forward(self, x):
        return {"out": self.inner(x), "aux": None}


class TupleOutput(DictOutput):
    """A model whose forward returns a tuple (logits first)."""

    def forward(self, x):
        return (self.inner(x), None)


def test_dict_and_tuple_outputs_are_handled(tmp_path: Path) -> None:
    image = np.zeros((50, 40), np.uint8)
    for module in (DictOutput(), TupleOutput()):
        torch.save(module, tmp_path / "wrapped.pt")
        member = SmpMember(_spec(tmp_path), trust_pickle=True)
        member._models[0] = member.load_checkpoint(tmp_path / "wrapped.pt")
        assert member.predict([image], [0])[0].shape == (29, 50, 40)


def test_bad_checkpoints_and_specs(tmp_path: Path) -> None:
    wrong_classes = smp.Unet("resnet18", encoder_weights=None, classes=3)
    torch.save(wrong_classes.state_dict(), tmp_path / "three.pt")
    with pytest.raises(SegensError, match="do not fit"):
        SmpMember(_spec(tmp_path)).load_checkpoint(tmp_path / "three.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SegensError, match="junk.pt"):
        SmpMember(_spec(tmp_path)).load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(SegensError, match="unknown encoder 'resnet1800'.*resnet18"):
        SmpMember(_spec(tmp_path, encoder="resnet1800")).new_model()
    with pytest.raises(SegensError, match="unknown architecture 'UNetXL'.*UnetPlusPlus"):
        SmpMember(_spec(tmp_path, architecture="UNetXL")).new_model()
    with pytest.raises(SegensError, match="unknown model field"):
        SmpMember(_spec(tmp_path, colour="blue"))
    with pytest.raises(SegensError, match="multiple of 32"):
        SmpMember(MemberSpec(name="m", kind="smp", input_size=(50, 64), model={"architecture": "Unet", "encoder": "resnet18"}))


def test_folds_file_that_does_not_match_the_root_stops_before_training(small_root: Path, folds_file: Path,
                                                                        tmp_path: Path) -> None:
    """Through the real command line: one line on stderr naming the file, exit status 2, no traceback."""
    doc = json.loads(folds_file.read_text())
    doc["folds"].pop(next(iter(doc["folds"])))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    spec_path = write_spec(tmp_path / "member.yaml", epochs=1)
    result = subprocess.run([sys.executable, "-m", "segens.cli", "train-member", str(spec_path), "--data",
                             str(small_root), "--folds", str(broken)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert re.search(r"broken\.json: every training image of .* must be in exactly one fold, but there are 1 "
                     r"training image\(s\) without a fold .*re-run `ens folds make`", message), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unetpp-r18").exists()


class _Scaled(torch.nn.Module):
    """A model whose logits are ``scale`` times another's: large logits, as trained models give."""

    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


@pytest.mark.parametrize("logit_scale", [1.0, 40.0])
def test_folds_and_flip_are_averaged_as_a_straightforward_reference_does(tmp_path: Path, logit_scale: float) -> None:
    """Two different fold models, hflip TTA, images larger than the input and not square: the member's maps are
    the mean over folds and passes of sigmoid(bilinear upsampling of the logits), computed independently (images
    constant on 2x2 and 2x3 blocks, so that resizing to the 64x64 input is exact under any averaging rule). With
    large logits, averaging in logit space instead would be far off."""
    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64), tta=["hflip"],
                      model={"architecture": "Unet", "encoder": "resnet18"}, path=tmp_path / "m.yaml")
    member = SmpMember(spec)
    models = []
    for fold in (0, 1):
        torch.manual_seed(fold)
        models.append(_Scaled(smp.Unet("resnet18", encoder_weights=None, classes=29), logit_scale).eval())
        member._models[fold] = models[-1]
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    images = [np.kron(small, np.ones((2, 2), np.uint8)), np.kron(small, np.ones((2, 3), np.uint8))]
    x = torch.from_numpy(small.astype(np.float32) / 255)[None, None].repeat(1, 3, 1, 1)
    for image, ours in zip(images, member.predict(images, [0, 1])):
        terms, logit_terms = [], []
        with torch.no_grad():
            for model in models:
                for logits in (model(x), model(x.flip(-1)).flip(-1)):
                    upsampled = torch.nn.functional.interpolate(logits, size=image.shape, mode="bilinear",
                                                                align_corners=False)
                    terms.append(torch.sigmoid(upsampled)[0].numpy().astype(np.float64))
                    logit_terms.append(upsampled[0].numpy().astype(np.float64))
        expected = np.mean(terms, axis=0)
        if logit_scale > 1:  # the broken rule, sigmoid(mean logit), is far from the right one here
            assert np.abs(1 / (1 + np.exp(-np.mean(logit_terms, axis=0))) - expected).max() > 0.1
        assert ours.shape == (29, *image.shape) and ours.dtype == np.float32
        # float32 rounding of the upsampled logits grows with their size: 4e-6 at 40x, still far below the 0.1 above
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 if logit_scale == 1 else 2e-5)
        assert np.abs(np.mean(terms[:2], axis=0) - expected).max() > 1e-3  # fold 1 matters
        assert np.abs(np.mean(terms[::2], axis=0) - expected).max() > 1e-3  # the flipped pass matters


def test_fast_uint8_path_equals_quantized_probabilities(tmp_path: Path) -> None:
    from segens.store import quantize

    spec = MemberSpec(name="m", kind="smp", input_size=(64, 64), tta=["hflip"],
                      model={"architecture": "Unet", "encoder": "resnet18"}, path=tmp_path / "m.yaml")
    member = SmpMember(spec)
    for fold in (0, 1):
        torch.manual_seed(fold)
        member._models[fold] = member.new_model().eval()
    images = [np.random.default_rng(i).integers(0, 255, shape, dtype=np.uint8) for i, shape in
              enumerate([(128, 128), (100, 150)])]
    for folds in ([0], [0, 1]):
        expected = [quantize(p) for p in member.predict(images, folds)]
        for (values, boxes), wanted in zip(member.predict_uint8(images, folds), expected):
            assert np.array_equal(values, wanted)


def test_weights_of_another_encoder_are_an_error_naming_file_and_architecture(tmp_path: Path) -> None:
    other = smp.Unet(encoder_name="resnet34", encoder_weights=None, classes=29)
    torch.save(other.state_dict(), tmp_path / "resnet34.pt")
    member = SmpMember(_spec(tmp_path))
    with pytest.raises(SegensError, match=r"resnet34\.pt: weights do not fit Unet/resnet18 with 29 classes "
                                          r"\(Error\(s\) in loading state_dict for Unet: Unexpected key"):
        member.load_checkpoint(tmp_path / "resnet34.pt")


def test_damaged_segens_checkpoints_are_errors_for_predict_and_inspect(tmp_path: Path) -> None:
    from segens.members.inspect_checkpoint import inspect_checkpoint

    other = smp.Unet(encoder_name="resnet34", encoder_weights=None, classes=29)
    payload = {"format": "segens-smp", "version": 2, "encoder": "resnet18", "in_channels": 3,
               "state_dict": other.state_dict()}
    torch.save(payload, tmp_path / "no-architecture.pt")
    torch.save({**payload, "architecture": "Unet"}, tmp_path / "other-weights.pt")
    member = SmpMember(_spec(tmp_path))
    for load in (member.load_checkpoint, inspect_checkpoint):
        with pytest.raises(SegensError, match=r"no-architecture\.pt: a segens checkpoint without architecture"):
            load(tmp_path / "no-architecture.pt")
        with pytest.raises(SegensError, match=r"other-weights\.pt: its weights do not fit its recorded Unet/resnet18 "
                                              r"\(Error\(s\) in loading state_dict"):
            load(tmp_path / "other-weights.pt")
