"""Golden outputs: every store, CSV, recipe and report the workflow writes on one fixed fixture, pinned by sha256.

The restructuring of segens (one home per concept) had to leave every output byte-identical; this test proves it
and keeps proving it. The fixture is integer-made (members' maps are box-filtered, shifted label masks with
integer noise, written through the store API; a csv member is imported through ``ens predict-member``), so its
bytes do not depend on the CPU's float kernels. A change that moves any digest is a behaviour change: say so in
its commit and update the digest here (run with ``SEGENS_PRINT_GOLDEN=1`` to print the new ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import NUM_CLASSES
from segens.conventions.dataset import discover
from segens.conventions.labels import read_label_mask
from segens.conventions.rle import encode
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.store import create_store
from segens.synth import generate

MEMBERS = {"alpha": (0, 1, 2), "beta": (1, -1, 3), "gamma": (-1, 0, 4)}  # name: (row shift, col shift, radius)


def member_maps(truth: np.ndarray, shift: tuple[int, int], radius: int, seed: int) -> np.ndarray:
    """(29, H, W) uint8: each class's mask shifted, box-filtered (integer sums), with integer noise and a spot."""
    rng = np.random.default_rng(seed)
    height, width = truth.shape[1:]
    out = np.zeros(truth.shape, np.uint8)
    side = 2 * radius + 1
    for channel in range(NUM_CLASSES):
        shifted = np.roll(truth[channel], shift, axis=(0, 1)).astype(np.int64)
        padded = np.pad(shifted, radius + 1)
        sums = padded.cumsum(0).cumsum(1)
        window = (sums[side:side + height, side:side + width] - sums[:height, side:side + width]
                  - sums[side:side + height, :width] + sums[:height, :width])
        values = window * 255 // (side * side)
        values = values + rng.integers(-12, 13, values.shape) * (values > 0)
        if rng.random() < 0.3:  # a faint false positive somewhere
            r, c = int(rng.integers(0, height - 6)), int(rng.integers(0, width - 6))
            values[r:r + 5, c:c + 5] = np.maximum(values[r:r + 5, c:c + 5], int(rng.integers(60, 200)))
        out[channel] = np.clip(values, 0, 255).astype(np.uint8)
    return out


def write_csv(path: Path, maps: dict[str, np.ndarray]) -> None:
    """A submission CSV of maps > 127 (competition order, as segens writes it)."""
    lines = ["image_name,class,rle"]
    from segens.conventions.classes import CLASSES

    for key in sorted(maps, key=lambda key: key + ".png"):
        for name, plane in zip(CLASSES, maps[key]):
            lines.append(f"{key.rsplit('/', 1)[-1]}.png,{name},{encode(plane > 127)}")
    path.write_text("\n".join(lines) + "\n")


def invoke(*arguments: str) -> str:
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    return result.output


def build(base: Path) -> Path:
    """The fixture: data root, folds, three fixture members' stores, a csv member's stores."""
    root = base / "data"
    generate(root, n_train_patients=6, n_test_patients=2, size=96, seed=11)
    folds, _ = make_folds(root, k=3, seed=0)
    save_folds(folds, base / "folds.json")
    stores = base / "stores"
    csv_maps: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for split, data_split in (("oof", "train"), ("test", "test")):
        records = discover(root, data_split, require_labels=True).records
        for number, (name, (dr, dc, radius)) in enumerate(MEMBERS.items()):
            store = create_store(stores / f"{name}.{split}.zarr", name, "fixture", split, {"name": name},
                                 {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}},
                                 images=[record.key for record in records])
            for index, record in enumerate(records):
                truth = read_label_mask(record.label_path, 96, 96)
                maps = member_maps(truth, (dr, dc), radius, seed=1000 * number + index)
                store.write_image(record.key, maps)
                if name == "beta":
                    csv_maps[data_split][record.key] = maps
    write_csv(base / "team_oof.csv", csv_maps["train"])
    write_csv(base / "team_test.csv", csv_maps["test"])
    (base / "team.yaml").write_text(yaml.safe_dump({"name": "team", "kind": "csv",
                                                    "model": {"oof": "team_oof.csv", "test": "team_test.csv"}}))
    invoke("predict-member", base / "team.yaml", "--split", "oof", "--data", root, "--folds", base / "folds.json",
           "--out", stores / "team.oof.zarr")
    invoke("predict-member", base / "team.yaml", "--split", "test", "--data", root, "--out", stores / "team.test.zarr")
    return base


def normalised(text: str, base: Path) -> str:
    return text.replace(str(base.resolve()), "<base>").replace(str(base), "<base>")


def digest_json(document, base: Path) -> str:
    return hashlib.sha256(normalised(json.dumps(document, sort_keys=True), base).encode()).hexdigest()


def digest_store(path: Path, base: Path) -> str:
    """sha256 over every file of a store (relative name and bytes; JSON with the fixture's folder made neutral)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        data = file.read_bytes()
        if file == path / "zarr.json":  # the root's own digest covers the fixture's folder: the rest is hashed
            document = json.loads(data)
            document["attributes"].pop("digest", None)
            data = json.dumps(document).encode()
        digest.update(normalised(data.decode(), base).encode() if file.name == "zarr.json" else data)
    return digest.hexdigest()


def digest_recipe(path: Path, base: Path) -> str:
    recipe = json.loads(path.read_text())
    recipe["search"].pop("seconds")  # wall time
    return digest_json(recipe, base)


def digest_file(path: Path, base: Path) -> str:
    return hashlib.sha256(normalised(path.read_text(), base).encode()).hexdigest()


GOLDEN = {
    'store alpha.oof.zarr': '61835ef7c716d5479eb77d7c9432092514ff1504b95dd3c20d947f6a14b9f966',
    'store beta.oof.zarr': '3129301484e290dbb994e4dc679025c264c52af18e46fb3caab7d27c9be3c3fa',
    'store gamma.oof.zarr': 'a4cbac29e7fd69494584d01b8f9886f67127708f4603b3d5e09d8deb56fc8b7f',
    'store team.oof.zarr': '29c40701e95226043239a9068c4fab037bb39ef5a5d09402d668ae2820d56242',
    'store alpha.test.zarr': 'ad834ca092fd7359051fefb37f30b9fbfd6c2f6ce67235ca86e0ca65bcf2946d',
    'store beta.test.zarr': 'd9abd49ce2c747c0f5c25836f4261007b9ba22fd631543dad495b6a82b5d9f8f',
    'store gamma.test.zarr': 'abc52b6f0937acc513cc0fe3b316ead486b1f9f5540346ca9e3259c3e05b636c',
    'store team.test.zarr': '44fba0e4cecb2158fee13814c556358f7a93007cde219a620fc9739f795de504',
    'recipe weighted cv': '2ccf23bd11e9df40b6244a70e58ebdf3ed16dff6ca70a64af02f392c6fbfe977',
    'report weighted cv': '0582bc466e4db8aae4cf775d5a049541d7065287aa47a404358238f938492649',
    'combine weighted recipe': '1114c1719f2a6300b384e66468de7ff491012b16bb184984e7f0924e2df9c370',
    'recipe soft cv': '21b84bee9b2b2c3e1039623d694bfa38c01d163eecdc9647f34150802d7770fb',
    'report soft cv': 'cd8135aeb5673914df28acdcc187bb970f1d56c97beaa30518e98b4e18b4c2ea',
    'combine soft recipe': '08fb42d73e10f6e97aab325f2a9159703a99da4f03ce2bf48d6a9956d254b2b9',
    'recipe hard cv': '11651dd5d2b0a96b1e3b711eed6f2951c987bd34e51169884afcb3fd6de41f6d',
    'report hard cv': '3894081b128d4d1011e184c1e85aa5bd9d57935b83f4cfdcf7431c48c548b962',
    'combine hard recipe': '6ff0726d0673a4648353f6112cdd84ec27d55e7a033557325b1426925abdebae',
    'recipe weighted caruana': 'acd1e1d4fe6b68dcd96ece0b9b8b0b291dc710ed3b5b37200f0b93d3d7ae3396',
    'combine soft': 'cbec659032e0f3061827f650c3d006f28036f92f0dae2612e91f92a2aa5118c6',
    'combine soft threshold': '9ab504403d4a105b8f93dae27868cbfe7bfc2e3727de36d961c3756d40d93c3e',
    'combine weighted weights': '5b1c28c3ec8c393f98309852fd3d56017af26fc2dd33e8495e714f7189eef8c1',
    'combine hard': 'b73f0c06db8675aeeb731d48bd239824026d55154203a4806adbece56d347185',
    'combine hard min-votes': '4f6eadb4ce0986a0286f64cea8ac10c65a1f4c0eeedae6658da4e810a1824a2e',
    'masks store': '60165a6379fa7eae0c3595eb39eaf19acd62266524c654e66cc6ecd56c0bb8c4',
    'evaluate csv json': '5905c357f2f9241a96ffeafb174bbca27bbb994aa324db157c1ae947fa33dac5',
    'evaluate oof stores json': '0e8e6fb10167b4632b5b28e4212c20752f75f9d6c422a8c1669022c3de20ef2a',
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    base = build(tmp_path_factory.mktemp("golden"))
    stores = base / "stores"
    oof = [stores / f"{name}.oof.zarr" for name in [*MEMBERS, "team"]]
    test = [stores / f"{name}.test.zarr" for name in [*MEMBERS, "team"]]
    data, folds = base / "data", base / "folds.json"
    digests = {f"store {path.name}": digest_store(path, base) for path in oof + test}
    for strategy in ("weighted", "soft", "hard"):
        recipe, report = base / f"recipe_{strategy}.json", base / f"report_{strategy}.csv"
        invoke("search-weights", *oof, "--data", data, "--folds", folds, "--cv", "--strategy", strategy,
               "--step", "0.25", "--out", recipe, "--report-csv", report)
        digests[f"recipe {strategy} cv"] = digest_recipe(recipe, base)
        digests[f"report {strategy} cv"] = digest_file(report, base)
        csv = base / f"combined_{strategy}.csv"
        invoke("combine", *test, "--strategy", strategy, "--recipe", recipe, "--out", csv)
        digests[f"combine {strategy} recipe"] = digest_file(csv, base)
    invoke("search-weights", *oof[:3], "--data", data, "--strategy", "weighted", "--method", "caruana",
           "--step", "0.2", "--no-postprocess", "--out", base / "recipe_caruana.json")
    digests["recipe weighted caruana"] = digest_recipe(base / "recipe_caruana.json", base)
    plain = {"soft": [], "soft threshold": ["--threshold", "0.4"], "weighted weights": ["--weights",
             "alpha=2,beta=1,gamma=1,team=0.5"], "hard": [], "hard min-votes": ["--min-votes", "2"]}
    for label, extra in plain.items():
        csv = base / f"plain_{label.replace(' ', '_')}.csv"
        invoke("combine", *test, "--strategy", label.split()[0], *extra, "--out", csv,
               *(["--masks-out", base / "masks.zarr"] if label == "soft" else []))
        digests[f"combine {label}"] = digest_file(csv, base)
    digests["masks store"] = digest_store(base / "masks.zarr", base)
    evaluated = invoke("evaluate", base / "combined_weighted.csv", base / "plain_hard.csv", base / "masks.zarr",
                       "--data", data, "--json")
    digests["evaluate csv json"] = hashlib.sha256(normalised(evaluated, base).encode()).hexdigest()
    digests["evaluate oof stores json"] = hashlib.sha256(normalised(invoke(
        "evaluate", *oof, "--data", data, "--threshold", "0.3", "--json"), base).encode()).hexdigest()
    return digests


def test_every_output_is_byte_identical_to_the_golden_digests(outputs):
    if os.environ.get("SEGENS_PRINT_GOLDEN"):
        print("GOLDEN = {\n" + "".join(f"    {key!r}: {value!r},\n" for key, value in outputs.items()) + "}")
    assert outputs == GOLDEN
