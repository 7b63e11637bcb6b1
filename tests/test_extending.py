"""A new strategy or member kind is one new file plus a registration: the two toys of docs/architecture.md
(docs/examples/) run through the real commands, against straightforward references; kinds that cannot train say
so; ``ens --help`` lists the commands in workflow order; no module of segens grows past 400 lines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_golden import MEMBERS, build
from typer.testing import CliRunner

from segens.cli import app
from segens.cli._app import WORKFLOW
from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover
from segens.conventions.rle import decode
from segens.conventions.submission import read_submission
from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_store, evaluate_submission
from segens.errors import SegensError
from segens.members.predict import predict_member
from segens.members.train import train_member
from segens.search.run import search_weights
from segens.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str) -> None:
    """Import docs/examples/<name>.py (its decorator registers it)."""
    spec = importlib.util.spec_from_file_location(f"segens_docs_{name}", ROOT / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The golden fixture, with the two toys registered for this module's tests only (the registries are restored
    after them, so other tests see the built-in strategies and kinds alone)."""
    from segens.members import registry as kinds
    from segens.voting import registry as strategies

    load_example("max_vote")
    load_example("oracle_member")
    yield build(tmp_path_factory.mktemp("extending"))
    del strategies._STRATEGIES["max"], kinds._FACTORIES["oracle"]


def stores_of(project: Path, split: str) -> list[str]:
    return [str(project / "stores" / f"{name}.{split}.zarr") for name in MEMBERS]


def test_a_toy_strategy_combines_as_its_straightforward_reference(project: Path, tmp_path: Path) -> None:
    combine(stores_of(project, "test"), tmp_path / "max.csv", "max", threshold=0.4, progress=False)
    submission = read_submission(tmp_path / "max.csv")
    stores = [open_store(path) for path in stores_of(project, "test")]
    for key in stores[0].keys():
        highest = np.maximum.reduce([store.read(key).astype(np.float32) / np.float32(255) for store in stores])
        height, width = stores[0].image_size(key)
        rles = submission.image(key.rsplit("/", 1)[-1] + ".png")
        for channel, name in enumerate(CLASSES):
            np.testing.assert_array_equal(decode(rles[channel], height, width), highest[channel] > np.float32(0.4),
                                          err_msg=f"{key} {name}")


def test_a_toy_strategy_is_searched_exactly(project: Path, tmp_path: Path) -> None:
    """The generic search path of the base class: the recipe it writes, applied by combine to the OOF stores,
    scores exactly the OOF Dice the search reported, class by class."""
    report = search_weights(stores_of(project, "oof"), project / "data", project / "folds.json", tmp_path / "r.json",
                            strategy="max", cv=True, progress=False)
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert recipe["strategy"] == "max" and len(recipe["thresholds"]) == len(CLASSES)
    assert {result.level for result in report.classes} <= {"plain", "searched"}
    combine(stores_of(project, "oof"), tmp_path / "oof.csv", "max", recipe_path=tmp_path / "r.json", progress=False)
    table = evaluate_submission(tmp_path / "oof.csv", project / "data", "train")
    np.testing.assert_allclose(table.per_class(), [recipe["oof_dice"]["per_class"][name] for name in CLASSES],
                               rtol=0, atol=1e-12)


def test_auto_tries_a_registered_strategy(project: Path, tmp_path: Path) -> None:
    """``--strategy auto``'s candidates are the registry's, in its order: the toy 'max' is searched beside the
    built-ins on the same evidence and judged by the same held-out rule (step 0.5, no post-processing: cheap)."""
    report = search_weights(stores_of(project, "oof"), project / "data", project / "folds.json", tmp_path / "r.json",
                            strategy="auto", step=0.5, cv=True, postprocess=False, progress=False)
    searched = ["soft", "weighted", "hard", "max"]  # the registry's order: built-ins, then the toy
    assert list(report.alternatives) == [name for name in searched if name != report.strategy]
    assert "max beats" in report.choice_reason or "max does not reliably beat" in report.choice_reason
    assert json.loads((tmp_path / "r.json").read_text())["search"]["strategy"] == "auto"


def test_a_toy_member_kind_predicts_trains_never_and_joins_a_search(project: Path, tmp_path: Path) -> None:
    spec = tmp_path / "oracle.yaml"
    spec.write_text(yaml.safe_dump({"name": "oracle", "kind": "oracle"}))
    for split in ("oof", "test"):
        predict_member(spec, split, project / "data", tmp_path / f"oracle.{split}.zarr",
                       folds_path=project / "folds.json", progress=False)
    assert evaluate_store(tmp_path / "oracle.test.zarr", project / "data").mean() == 1.0
    with pytest.raises(SegensError, match="oracle.yaml: kind oracle is not trained by segens"):
        train_member(spec, project / "data", project / "folds.json", progress=False)
    report = search_weights([*stores_of(project, "oof"), str(tmp_path / "oracle.oof.zarr")], project / "data",
                            None, tmp_path / "r.json", step=0.25, postprocess=False, progress=False)
    assert report.summary()["recipe"] == 1.0  # the oracle alone is perfect and the search finds it


def test_kinds_that_cannot_train_say_so(project: Path, tmp_path: Path) -> None:
    (tmp_path / "team.yaml").write_text(yaml.safe_dump({"name": "team", "kind": "csv", "model": {
        "oof": str(project / "team_oof.csv"), "test": str(project / "team_test.csv")}}))
    with pytest.raises(SegensError, match=r"team\.yaml: kind csv is not trained by segens \(its masks are read from "
                                          r"submission CSVs\)"):
        train_member(tmp_path / "team.yaml", project / "data", project / "folds.json", progress=False)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "csv", "train": {"epochs": 1}}))
    with pytest.raises(SegensError, match=r"t\.yaml: kind csv has no 'train' settings"):
        train_member(tmp_path / "t.yaml", project / "data", project / "folds.json", progress=False)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": "m", "kind": "torch", "model": {"factory": "x:y"}}))
    with pytest.raises(SegensError, match=r"m\.yaml: kind torch is not trained by segens \(its models are trained by "
                                          r"your own script\)"):
        train_member(tmp_path / "m.yaml", project / "data", project / "folds.json", progress=False)


def test_help_lists_the_commands_in_workflow_order() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=80)
    # a command's row starts with its name; a wrapped description's lines are indented (and may name commands)
    listed = [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and
              not line.startswith("│  ") and len(line.split()) > 1 and line.split()[1] in WORKFLOW]
    assert listed == list(WORKFLOW)


def test_no_module_is_over_400_lines() -> None:
    long = {str(path.relative_to(ROOT)): count for path in (ROOT / "segens").rglob("*.py")
            if (count := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_the_evidence_rows_a_toy_keeps_match_its_rule(project: Path) -> None:
    """The base class's generic search scores kept rows; they come from the strategy's own ``keep``."""
    from segens.search.evidence import extract_class, threshold_grid
    from segens.voting import get_strategy
    from segens.voting.base import Choice

    stores = [open_store(path) for path in stores_of(project, "oof")]
    records = discover(project / "data", "train").records
    evidence = extract_class(stores, records, 21, threshold_grid())
    kept = get_strategy("max").kept_rows(evidence.values, Choice(np.ones(3), 100), threshold_grid())
    expected = (evidence.values.max(axis=0).astype(np.float32) / np.float32(255)) > threshold_grid()[100]
    np.testing.assert_array_equal(kept, expected)
