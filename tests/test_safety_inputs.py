"""Validated input (issue 14, groups 3, 4 and 6): recipe.json, folds.json, label JSON, CSVs, RLEs, image headers,
meta_data.xlsx and command-line settings, each refused with a SegensError naming the file (image, class) and
what to do; through the CLI, exit code 2 with no traceback and no output file. All with real files on disk."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import flat
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions import rle
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import MAX_IMAGE_SIDE, discover, image_size, read_image
from segens.conventions.labels import parse_label_json
from segens.conventions.metadata import MAX_XLSX_EXPANDED, read_metadata
from segens.conventions.submission import image_rows, read_submission, write_submission
from segens.ensemble.combine import combine, parse_weights, resolve_settings
from segens.errors import SegensError
from segens.folds.file import load_folds, save_folds
from segens.folds.splits import make_folds
from segens.infra.backend import check_jobs, parse_storage_options
from segens.search.run import search_weights
from segens.store import create_store
from segens.voting.mean import MAX_GRID_CANDIDATES, check_grid_size
from segens.voting.recipe import Recipe, load_recipe

DEEP = 100_000  # nesting levels of the hostile JSON documents
MEMBERS = ["vgg", "hrnet"]
KEYS = ["ID001/image1", "ID002/image2"]


def ens(*args: object) -> subprocess.CompletedProcess:
    """Run the real ``ens`` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "segens.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "400"})


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one clear error (every fragment in it), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------------------- stores and recipes


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    """Two members' test stores of two 16x20 images with non-zero probabilities in every class."""
    base = tmp_path_factory.mktemp("stores")
    paths = []
    for seed, member in enumerate(MEMBERS):
        path = base / f"{member}.test.zarr"
        store = create_store(path, member, "smp", "test", {"name": member}, {0: {"path": f"{member}.pt",
                                                                                 "sha256": f"sha-{member}"}},
                             images=KEYS)
        rng = np.random.default_rng(seed)
        for key in KEYS:
            store.write_image(key, rng.integers(0, 256, (NUM_CLASSES, 16, 20), dtype=np.uint8))
        paths.append(path)
    return paths


def recipe_document(strategy: str = "weighted") -> dict:
    recipe = Recipe(strategy, [{"name": m, "checkpoints": {"0": f"sha-{m}"}} for m in MEMBERS])
    if strategy == "hard":
        recipe.weights = [[1.0, 1.0] for _ in CLASSES]
        recipe.member_thresholds = [[0.5, 0.5] for _ in CLASSES]
        recipe.min_votes = [1.0 for _ in CLASSES]
    else:
        recipe.weights = [[1.0, 2.0] for _ in CLASSES]
        recipe.thresholds = [0.5 for _ in CLASSES]
    return recipe.to_dict()


def write_recipe(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))  # allow_nan: NaN and Infinity are written as the JSON tokens Python reads
    return path


def _set(field: str, value) -> callable:
    return lambda d: d.update({field: value})


def _cell(field: str, row: int, column: int | None, value) -> callable:
    def edit(d: dict) -> None:
        if column is None:
            d[field][row] = value
        else:
            d[field][row][column] = value
    return edit


@pytest.mark.parametrize(
    ("strategy", "edit", "message"),
    [
        ("weighted", _cell("weights", 3, 0, float("nan")), r"weights\.3\.0: Input should be a finite number"),
        ("weighted", _cell("weights", 0, 1, float("inf")), r"weights\.0\.1: Input should be a finite number"),
        ("weighted", _set("weights", [[1e308, 1e308] for _ in CLASSES]),
         "weights of class finger-1 are too large .*overflows"),
        ("weighted", _cell("weights", 5, 0, -1.0), r"weights\.5\.0: Input should be greater than or equal to 0"),
        ("weighted", _set("weights", [[0.0, 0.0] for _ in CLASSES]), "weights of class finger-1 sum to 0"),
        ("weighted", _cell("weights", 2, 0, "1"), r"weights\.2\.0: Input should be a valid number"),
        ("weighted", _cell("weights", 2, 0, True), r"weights\.2\.0: Input should be a valid number"),
        ("weighted", _cell("weights", 7, None, [1.0]), "'weights' for class finger-8 has 1 numbers; it needs 2"),
        ("weighted", _set("weights", [[1.0, 1.0]]), "'weights' has 1 entries; it needs 29"),
        ("weighted", _cell("thresholds", 4, None, 1.0), r"thresholds\.4: Input should be less than 1"),
        ("weighted", _cell("thresholds", 4, None, float("nan")), r"thresholds\.4: Input should be a finite number"),
        ("weighted", _cell("thresholds", 4, None, None), r"thresholds\.4: Input should be a valid number"),
        ("hard", _cell("min_votes", 0, None, float("nan")), r"min_votes\.0: Input should be a finite number"),
        ("hard", _cell("min_votes", 0, None, 0.0), r"min_votes\.0: Input should be greater than 0"),
        ("hard", _cell("member_thresholds", 1, 1, -0.1), r"member_thresholds\.1\.1: Input should be greater"),
        ("hard", _set("weights", [[1e39, 1.0] for _ in CLASSES]), "weights of class finger-1 are too large"),
        ("weighted", _set("members", None), "members: Input should be a valid list"),
        ("weighted", _set("members", [["vgg"], ["hrnet"]]), r"members\.0: Input should be .*(dictionary|object)"),
        ("weighted", _set("members", {"name": "vgg"}), "members: Input should be a valid list"),
        ("weighted", _set("members", [{"name": "vgg"}, {"name": "vgg"}]), "names a member twice"),
        ("weighted", _set("strategy", "mean"), "strategy: Input should be 'soft', 'weighted' or 'hard'"),
        ("weighted", _set("postprocess", [["erode"]] * 29), r"postprocess\.0\.0: Input should be"),
        ("weighted", _set("colour", "red"), "colour: Extra inputs are not permitted"),
        ("weighted", _set("version", "1"), r"not a segens recipe of a version this segens reads \(1, 2; version '1'\)"),
        ("weighted", lambda d: d.clear(), "not a segens recipe"),
    ],
)
def test_recipe_schema(tmp_path: Path, strategy: str, edit, message: str) -> None:
    document = recipe_document(strategy)
    edit(document)
    path = write_recipe(tmp_path / "recipe.json", document)
    with pytest.raises(SegensError, match=message) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_recipe_encoding_and_nesting(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps(recipe_document()).encode())  # a BOM, as Windows editors write
    assert load_recipe(good).weights[0] == [1.0, 2.0]
    latin = tmp_path / "latin.json"
    text = json.dumps(recipe_document() | {"search": {"note": "é"}}, ensure_ascii=False).encode()
    latin.write_bytes(text.replace("é".encode(), b"\xe9"))
    offset = text.index("é".encode())
    with pytest.raises(SegensError, match=rf"latin.json: recipe is not UTF-8 text \(byte {offset}: "):
        load_recipe(latin)
    deep = tmp_path / "deep.json"
    deep.write_text('{"version": 1, "search": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(SegensError, match="deep.json: recipe nests deeper than 64 levels"):
        load_recipe(deep)
    with pytest.raises(SegensError, match="absent.json: cannot read recipe"):
        load_recipe(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_cell("weights", 3, 0, float("nan")), "weights.3.0: Input should be a finite number"),
        (_set("weights", [[1e308, 1e308] for _ in CLASSES]), "weights of class finger-1 are too large"),
        (_set("members", [["vgg"], ["hrnet"]]), "members.0: Input should be"),
    ],
)
def test_cli_refuses_a_bad_recipe_before_writing(stores, tmp_path: Path, edit, fragment: str) -> None:
    document = recipe_document()
    edit(document)
    recipe = write_recipe(tmp_path / "recipe.json", document)
    out = tmp_path / "sub.csv"
    assert_refused(ens("combine", *stores, "--strategy", "weighted", "--recipe", recipe, "--out", out),
                   str(recipe), fragment)
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_cli_refuses_non_utf8_recipe(stores, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_bytes(json.dumps(recipe_document()).encode() + b"\n\xff")
    out = tmp_path / "sub.csv"
    assert_refused(ens("combine", *stores, "--strategy", "weighted", "--recipe", recipe, "--out", out),
                   f"{recipe}: recipe is not UTF-8 text (byte {recipe.stat().st_size - 1}: b'\\xff')", "save it as UTF-8")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--strategy", "weighted", "--weights", "vgg=nan,hrnet=1"], "--weights: member 'vgg' has weight 'nan'"),
        (["--strategy", "weighted", "--weights", "vgg=1e308,hrnet=1e308"], "--weights: weights of class finger-1 are too large"),
        (["--strategy", "hard", "--min-votes", "nan"], "--min-votes must be a finite number > 0, got nan"),
        (["--strategy", "soft", "--threshold", "nan"], "--threshold: threshold nan (class finger-1) must be a finite"),
    ],
)
def test_cli_refuses_non_finite_settings(stores, tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "sub.csv"
    assert_refused(ens("combine", *stores, *args, "--out", out), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("strategy", "weights", "options", "message"),
    [
        ("weighted", "vgg=1e999,hrnet=1", {}, "--weights: member 'vgg' has weight '1e999'"),
        ("weighted", "vgg=inf,hrnet=1", {}, "--weights: member 'vgg' has weight 'inf'"),
        ("weighted", "vgg=0,hrnet=0", {}, "--weights: weights of class finger-1 sum to 0"),
        ("hard", "vgg=1e39,hrnet=1", {}, "--weights: weights of class finger-1 are too large"),
        ("hard", "vgg=1e-46,hrnet=0", {}, "--weights: weights of class finger-1 sum to 0"),  # 0 as float32 votes
        ("hard", None, {"min_votes": float("inf")}, "--min-votes must be a finite number > 0, got inf"),
        ("hard", None, {"min_votes": 0.0}, "--min-votes must be a finite number > 0, got 0.0"),
        ("soft", None, {"threshold": 0.99999999999}, r"--threshold: threshold 0.99999999999 .*\[0, 1\)"),
        ("soft", None, {"threshold": -0.0001}, r"--threshold: threshold -0.0001"),
    ],
)
def test_command_line_settings(strategy: str, weights: str | None, options: dict, message: str) -> None:
    with pytest.raises(SegensError, match=message):
        resolve_settings(strategy, MEMBERS, weights=parse_weights(weights), **options)


def test_weights_and_settings_in_the_library(stores) -> None:
    assert parse_weights("vgg=2, hrnet=0") == {"vgg": 2.0, "hrnet": 0.0}
    for text, message in [("vgg=-1,hrnet=1", "finite numbers >= 0"), ("vgg=1,vgg=2", "names member 'vgg' twice"),
                          ("=1,hrnet=1", "names no member"), ("vgg=x", "must look like vgg=2,hrnet=1")]:
        with pytest.raises(SegensError, match=message):
            parse_weights(text)
    recipe = load_recipe_from(recipe_document("hard"))
    recipe.min_votes[6] = float("nan")  # a Recipe built in code, past the file's schema
    with pytest.raises(SegensError, match="the recipe: min_votes of class finger-7 must be a finite number > 0"):
        resolve_settings("hard", MEMBERS, recipe)
    settings = resolve_settings("hard", MEMBERS, weights={"vgg": 2.0, "hrnet": 1.0}, min_votes=2.5)
    assert settings.weights.dtype == np.float32 and settings.min_votes.tolist() == [2.5] * NUM_CLASSES
    with pytest.raises(SegensError, match=r"--jobs must be a whole number >= 1.*got 0"):
        combine(stores, Path("never.csv"), jobs=0, progress=False)
    assert not Path("never.csv").exists()
    assert check_jobs(3) == 3
    for bad in (-1, True, 1.5):
        with pytest.raises(SegensError, match="--jobs must be a whole number >= 1"):
            check_jobs(bad)


def load_recipe_from(document: dict) -> Recipe:
    from segens.voting.recipe import recipe_from_dict

    return recipe_from_dict(document, "in memory")


@pytest.mark.parametrize(
    "command",
    [
        ["combine", "a.zarr", "--out", "o.csv"],
        ["search-weights", "a.zarr", "--data", "d"],
        ["train-member", "m.yaml", "--data", "d", "--folds", "f.json"],
        ["predict-member", "m.yaml", "--split", "test", "--data", "d", "--out", "o.zarr"],
    ],
)
@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_every_jobs_option_refuses_less_than_one(command: list[str], jobs: str) -> None:
    result = CliRunner().invoke(app, [*command, "--jobs", jobs])
    assert result.exit_code == 2
    assert "Invalid value for '--jobs': Input should be greater than or equal to 1" in flat(result.output)


def test_search_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    for step in (float("nan"), 0.0, 0.6, float("inf"), 5e-324, 1e-300, 0.0009):
        with pytest.raises(SegensError, match="--step must be a number in"):
            search_weights([tmp_path / "absent.zarr"], tmp_path, None, tmp_path / "r.json", step=step, progress=False)
    with pytest.raises(SegensError, match="--jobs must be a whole number >= 1"):
        search_weights([tmp_path / "absent.zarr"], tmp_path, None, tmp_path / "r.json", jobs=0, progress=False)
    assert check_grid_size(0.1, 3) == 66
    with pytest.raises(SegensError, match=rf"--step 0.001 with 3 members makes 501,501 .*at most {MAX_GRID_CANDIDATES:,}"):
        check_grid_size(0.001, 3)
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------- image names in a split


def test_duplicate_file_names_in_a_split(tiny_root: Path) -> None:
    source = tiny_root / "train" / "DCM" / "ID001" / "image1661130828153.png"
    shutil.copy(source, tiny_root / "train" / "DCM" / "ID002" / source.name)
    shutil.copy(source.parent.parent.parent / "outputs_json" / "ID001" / "image1661130828153.json",
                tiny_root / "train" / "outputs_json" / "ID002" / "image1661130828153.json")
    with pytest.raises(SegensError, match=r"train/DCM: images ID001/image1661130828153 and ID002/image1661130828153 "
                                          r"share the file name image1661130828153.png.*rename one"):
        discover(tiny_root, "train")
    assert len(discover(tiny_root, "test").records) == 2


def test_combine_refuses_store_keys_with_one_file_name(tmp_path: Path) -> None:
    keys = ["ID001/image7", "ID002/image7"]
    store = create_store(tmp_path / "m.test.zarr", "m", "smp", "test", {"name": "m"}, {0: {"path": "m.pt", "sha256": "s"}},
                         images=keys)
    for key in keys:
        store.write_image(key, np.full((NUM_CLASSES, 8, 8), 200, np.uint8))
    out = tmp_path / "sub.csv"
    assert_refused(ens("combine", tmp_path / "m.test.zarr", "--out", out),
                   "m.test.zarr: images ID001/image7 and ID002/image7 share the file name image7.png")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- folds.json


@pytest.fixture
def folds_file(tiny_root: Path, tmp_path: Path) -> Path:
    return save_folds(make_folds(tiny_root, k=2)[0], tmp_path / "folds.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("k", True), "k: Input should be a valid integer"),
        (_set("k", "2"), "k: Input should be a valid integer"),
        (_set("k", 2.0), "k: Input should be a valid integer"),
        (_set("seed", None), "seed: Input should be a valid integer"),
        (lambda d: d["folds"].update({next(iter(d["folds"])): 1.5}), r"folds\.ID001/image1661130828152_R: Input should be"),
        (_set("folds", [["ID001/a", 0]]), "folds: Input should be a valid dictionary"),
        (_set("image_list_sha256", "abc"), "image_list_sha256: String should match pattern"),
        (_set("method", "random"), "method: Input should be 'group' or 'stratified-group'"),
        (_set("extra", 1), "extra: Extra inputs are not permitted"),
        (lambda d: d.pop("shuffle"), "shuffle: Field required"),
    ],
)
def test_folds_schema(folds_file: Path, edit, message: str) -> None:
    document = json.loads(folds_file.read_text())
    edit(document)
    folds_file.write_text(json.dumps(document))
    with pytest.raises(SegensError, match=message) as caught:
        load_folds(folds_file)
    assert str(caught.value).startswith(f"{folds_file}: ") and "re-run `ens folds make`" in str(caught.value)


def test_folds_encoding_and_nesting(folds_file: Path, tiny_root: Path) -> None:
    text = folds_file.read_bytes()
    folds_file.write_bytes(b"\xef\xbb\xbf" + text)
    assert load_folds(folds_file, root=tiny_root).k == 2
    folds_file.write_bytes(text[:10] + b"\xfe" + text[10:])
    with pytest.raises(SegensError, match=r"folds.json: not a readable folds.json \(folds.json is not UTF-8 text "
                                          r"\(byte 10: b'\\xfe'\)"):
        load_folds(folds_file)
    folds_file.write_text('{"version": 1, "bins": ' + "[" * DEEP + "]" * DEEP + "}")
    assert_refused(ens("folds", "show", folds_file, "--data", tiny_root), f"{folds_file}: not a readable folds.json",
                   "nests deeper than 64 levels")


# ------------------------------------------------------------------------------------------------------ label JSON


def label_document() -> dict:
    """A valid label file with extra fields of the kind annotation tools add."""
    annotations = [{"id": f"{i:04d}", "type": "poly_seg", "attributes": {"tool": "x"}, "color": "#fff",
                    "points": [[1, 1], [5, 1.5], [5, 6]], "label": name} for i, name in enumerate(CLASSES)]
    return {"annotations": annotations, "metadata": {"width": 2048, "height": 2048}, "file_id": "a", "extra": [1, 2]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][2]["points"].__setitem__(1, [1, float("nan")]),
         r"annotations\.2\.points\.1\.1: Input should be a finite number"),
        (lambda d: d["annotations"][2]["points"].__setitem__(1, ["1", 2]),
         r"annotations\.2\.points\.1\.0: Input should be a valid number"),
        (lambda d: d["annotations"][2]["points"].__setitem__(1, [True, 2]),
         r"annotations\.2\.points\.1\.0: Input should be a valid number"),
        (lambda d: d["annotations"][2]["points"].__setitem__(1, [1e12, 2]),
         r"annotations\.2\.points\.1\.0: Input should be less than or equal to"),
        (lambda d: d["annotations"][2]["points"].__setitem__(1, [1, 2, 3]),
         r"annotations\.2\.points\.1: List should have at most 2 items"),
        (lambda d: d["annotations"][0].update(label=["finger-1"]), r"annotations\.0\.label: Input should be a valid string"),
        (lambda d: d["annotations"].__setitem__(4, None), r"annotations\.4: Input should be .*(dictionary|object)"),
    ],
)
def test_label_schema(tmp_path: Path, edit, message: str) -> None:
    document = label_document()
    edit(document)
    path = tmp_path / "label.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SegensError, match=message) as caught:
        parse_label_json(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_label_extra_fields_bom_and_nesting(tmp_path: Path) -> None:
    path = tmp_path / "label.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(label_document()).encode())
    polygons = parse_label_json(path)
    assert len(polygons) == NUM_CLASSES and polygons["Radius"].tolist() == [[1, 1], [5, 2], [5, 6]]
    path.write_text('{"annotations": [], "metadata": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(SegensError, match="label.json: label file nests deeper than 64 levels"):
        parse_label_json(path)
    path.write_bytes(json.dumps(label_document()).encode().replace(b'"tool"', b'"t\xc0ol"'))
    with pytest.raises(SegensError, match=r"label.json: label file is not UTF-8 text \(byte \d+: b'\\xc0'\)"):
        parse_label_json(path)


# ------------------------------------------------------------------------- CSVs, RLEs and images through ens evaluate


def empty_rows(root: Path) -> list[tuple[str, str, str]]:
    rows = []
    for record in discover(root, "test").records:
        rows += image_rows(record.name, [""] * NUM_CLASSES)
    return rows


def test_csv_with_a_bom_is_read(tiny_root: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    write_submission(plain, empty_rows(tiny_root))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_submission(bom).rles == read_submission(plain).rles
    result = ens("evaluate", bom, "--data", tiny_root, "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])


def test_non_utf8_csv_names_the_byte_offset(tiny_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    write_submission(path, empty_rows(tiny_root))
    data = path.read_bytes().replace(b"image1661140000001.png", b"image\xe91661140000001.png", 1)
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    assert_refused(ens("evaluate", path, "--data", tiny_root, "--split", "test"),
                   f"{path}: not UTF-8 text (byte {offset}: b'\\xe9'); save the CSV as UTF-8")
    # A bad byte after the first read block, a 2-byte character straddling the block boundary before it.
    prefix = b"image_name,class,rle\na.png,finger-1,"
    data = prefix + b"1" * ((1 << 20) - 1 - len(prefix)) + "é".encode() + b" 2\xff\n"
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(SegensError, match=rf"latin.csv: not UTF-8 text \(byte {offset}: b'\\xff'\)"):
        read_submission(path)


def test_checkerboard_rle_longer_than_the_csv_field_limit_round_trips(tmp_path: Path) -> None:
    rows, cols = np.indices((2048, 2048))
    mask = ((rows // 1 + cols // 1) % 2 == 0) | ((rows % 7) == 0)  # checkerboard-like: about 2 million runs
    text = rle.encode(mask)
    default = csv.field_size_limit(131072)  # the csv module's default, as a fresh interpreter has it
    try:
        assert len(text) > 131072
        path = tmp_path / "checker.csv"
        write_submission(path, image_rows("board.png", [text] + [""] * (NUM_CLASSES - 1)))
        back = read_submission(path).image("board.png")
    finally:
        csv.field_size_limit(max(default, csv.field_size_limit()))
    assert back[0] == text
    assert np.array_equal(rle.decode(back[0], 2048, 2048, "board.png finger-1"), mask)


@pytest.mark.parametrize(
    "text",
    ["1 99999999999999999999999", "9223372036854775807 9223372036854775807", "1 9223372036854775806",
     "1  " + "9" * 400, "1 4611686018427387905"],
)
def test_overflowing_rle_numbers(text: str) -> None:
    with pytest.raises(SegensError, match=r"sub.csv img.png Radius: RLE runs past the end of a 48x40 image"):
        rle.decode(text, 40, 48, where="sub.csv img.png Radius")


@pytest.mark.parametrize("text", ["1 ９", "1 1_0", "1 2 ³ 1"])
def test_rle_tokens_are_ascii_integers(text: str) -> None:
    with pytest.raises(SegensError, match="img.png Radius: RLE holds something other than integers"):
        rle.decode(text, 40, 48, where="img.png Radius")


def test_cli_overflowing_rle_names_image_and_class(tiny_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    rows = [(name, cls, "9223372036854775807 9223372036854775807" if cls == "Radius" and name == "image1661140000001.png"
             else "") for name, cls, _ in empty_rows(tiny_root)]
    write_submission(path, rows)
    assert_refused(ens("evaluate", path, "--data", tiny_root, "--split", "test"),
                   str(path), "image1661140000001.png", "Radius", "runs past the end of a 48x40 image")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk with a valid CRC claiming width x height (8-bit gray), and IEND: no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_png_header_claiming_a_huge_image_is_refused_before_decoding(tiny_root: Path, tmp_path: Path) -> None:
    image = tiny_root / "test" / "DCM" / "ID003" / "image1661140000001.png"
    image.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(SegensError, match=rf"image1661140000001.png: its header claims 100000x100000 pixels; segens "
                                          rf"reads images with sides from 1 to {MAX_IMAGE_SIDE}"):
        read_image(image)
    csv_path = tmp_path / "sub.csv"
    write_submission(csv_path, empty_rows(tiny_root))
    assert_refused(ens("evaluate", csv_path, "--data", tiny_root, "--split", "test"),
                   f"{image}: its header claims 100000x100000 pixels")
    image.write_bytes(png_header(48, 0))
    with pytest.raises(SegensError, match="claims 48x0 pixels"):
        image_size(image)
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 4)
    with pytest.raises(SegensError, match="image1661140000001.png: not a readable image"):
        image_size(image)


def test_other_image_formats_are_sized_from_their_header(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "really_a_jpeg.png"
    ok, encoded = cv2.imencode(".jpg", np.zeros((30, 50), np.uint8))
    path.write_bytes(encoded.tobytes())
    assert image_size(path) == (30, 50) and read_image(path).shape == (30, 50)
    path.write_bytes(b"GIF89a" + b"\0" * 3)
    with pytest.raises(SegensError, match="really_a_jpeg.png: not a readable image"):
        image_size(path)


def test_cli_deeply_nested_label_names_the_label_file(tiny_root: Path, tmp_path: Path) -> None:
    label = tiny_root / "test" / "outputs_json" / "ID003" / "image1661140000000.json"
    label.write_text('{"annotations": ' + "[" * DEEP + "]" * DEEP + "}")
    csv_path = tmp_path / "sub.csv"
    write_submission(csv_path, empty_rows(tiny_root))
    assert_refused(ens("evaluate", csv_path, "--data", tiny_root, "--split", "test"),
                   f"{label}: label file nests deeper than 64 levels")


# ------------------------------------------------------------------------------------ metadata and storage options


def test_metadata_zip_bomb_and_non_zip_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta_data.xlsx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 24)
            for _ in range(MAX_XLSX_EXPANDED // len(block) + 1):
                member.write(block)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(SegensError, match=r"meta_data.xlsx: the .xlsx expands to [\d,]+ bytes, more than the"):
        read_metadata(path)
    path.write_bytes(b"ID,age\n1,30\n")
    with pytest.raises(SegensError, match=r"meta_data.xlsx: not a readable .xlsx file \(BadZipFile"):
        read_metadata(path)


def test_storage_options_are_bounded_json() -> None:
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    with pytest.raises(SegensError, match="--storage-options: storage options nests deeper than 64 levels"):
        parse_storage_options("[" * DEEP + "]" * DEEP)
    with pytest.raises(SegensError, match="storage options must be a JSON object, got list"):
        parse_storage_options("[1]")


def test_allow_missing_refuses_an_image_whose_present_members_all_weigh_zero(stores, tmp_path: Path) -> None:
    short = create_store(tmp_path / "hrnet.test.zarr", "hrnet", "smp", "test", {"name": "hrnet"},
                         {0: {"path": "hrnet.pt", "sha256": "sha-hrnet"}}, images=KEYS)
    short.write_image(KEYS[0], np.full((NUM_CLASSES, 16, 20), 200, np.uint8))
    out = tmp_path / "sub.csv"
    with pytest.raises(SegensError, match=rf"image '{KEYS[1]}': the members present \(vgg\) all have weight 0 for "
                                          "class finger-1, so it could only be empty"):
        combine([stores[0], tmp_path / "hrnet.test.zarr"], out, "weighted", weights={"vgg": 0.0, "hrnet": 1.0},
                allow_missing=True, progress=False)
    assert not out.exists()
    summary = combine([stores[0], tmp_path / "hrnet.test.zarr"], out, "weighted", weights={"vgg": 1.0, "hrnet": 0.0},
                      allow_missing=True, progress=False)
    assert summary.missing == {"hrnet": 1} and summary.rows == len(KEYS) * NUM_CLASSES


@pytest.mark.parametrize("option, value", [("--jobs", 0), ("--batch-size", 0), ("--batch-size", -1)])
def test_predict_member_refuses_counts_below_one_in_the_library_and_the_cli(tmp_path: Path, option: str,
                                                                          value: int) -> None:
    from segens.members.predict import predict_member

    name = option.lstrip("-").replace("-", "_")
    with pytest.raises(SegensError, match=rf"{option} must be (an integer|a whole number) >= 1"):
        predict_member(tmp_path / "m.yaml", "test", tmp_path, tmp_path / "o.zarr", progress=False, **{name: value})
    result = CliRunner().invoke(app, ["predict-member", "m.yaml", "--split", "test", "--data", "d", "--out", "o.zarr",
                                      option, str(value)])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in flat(result.output)


def test_train_member_refuses_jobs_below_one_in_the_library(tmp_path: Path) -> None:
    from segens.members.train import train_member

    with pytest.raises(SegensError, match="--jobs must be a whole number >= 1"):
        train_member(tmp_path / "m.yaml", tmp_path, tmp_path / "f.json", jobs=0, progress=False)
