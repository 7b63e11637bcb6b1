"""Outputs never destroy data: checks before any work, --overwrite, inputs refused as outputs, atomic writes with
the umask's mode, stale temporaries of SIGKILLed writers removed (live writers' kept), and csv members whose
identity survives the split (a recipe searched on the oof store applies to the test store without --force)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.rle import encode_stack
from segens.conventions.submission import image_rows, write_submission
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.infra.atomic import atomic_write, atomic_write_text, host_tag, remove_stale_temporaries
from segens.infra.outputs import Output, check_outputs, is_store
from segens.members.predict import predict_member
from segens.members.train import train_member
from segens.search.run import search_weights
from segens.store import create_store, open_store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes under ``path``: equal digests, untouched tree."""
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + item.read_bytes())
    return digest.hexdigest()


# ---- atomic writes: modes and temporaries ------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set a real umask for the test, restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path: Path, umask) -> None:
    umask(0o022)
    atomic_write_text(tmp_path / "a.txt", "a")
    assert _mode(tmp_path / "a.txt") == 0o644
    umask(0o027)
    atomic_write_text(tmp_path / "b.txt", "b")
    assert _mode(tmp_path / "b.txt") == 0o640
    (tmp_path / "a.txt").chmod(0o664)
    umask(0o077)
    atomic_write_text(tmp_path / "a.txt", "new")  # replaced: keeps 0664 whatever the umask
    assert _mode(tmp_path / "a.txt") == 0o664 and (tmp_path / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(tmp_path / "a.txt") as handle:
        handle.write("half")
        raise RuntimeError("boom")
    assert (tmp_path / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


WRITER = """
import sys, time
from segens.infra.atomic import atomic_write
with atomic_write(sys.argv[1]) as handle:
    handle.write("partial")
    handle.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def _start_writer(target: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "writing"
    return process


def test_stale_temporaries_of_killed_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "sub.csv"
    killed = _start_writer(target)
    killed_temp = [p for p in tmp_path.iterdir() if f".{host_tag()}-{killed.pid}." in p.name]
    assert len(killed_temp) == 1 and killed_temp[0].name.startswith(".sub.csv.")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    live = _start_writer(target)
    try:
        live_temp = [p for p in tmp_path.iterdir() if f".{host_tag()}-{live.pid}." in p.name]
        foreign = [tmp_path / ".sub.csv.part", tmp_path / ".other.csv.1.0123abcd.part", tmp_path / "notes.part"]
        for path in foreign:
            path.write_text("not segens' temporary of sub.csv")
        atomic_write_text(target, "done")
        assert target.read_text() == "done" and not killed_temp[0].exists()
        assert live_temp[0].exists() and all(path.exists() for path in foreign)
        assert remove_stale_temporaries(target) == []
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(target) == live_temp  # its writer is gone now


def test_stale_temporaries_of_other_machines_are_left_alone(tmp_path: Path) -> None:
    """On a shared file system another machine's PIDs say nothing here: only this machine's dead writers go."""
    target = tmp_path / "sub.csv"
    dead = _start_writer(target)
    dead.kill()
    dead.wait()
    other_host = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    elsewhere = tmp_path / f".sub.csv.{other_host}-{dead.pid}.0123abcd.part"
    older_format = tmp_path / f".sub.csv.{dead.pid}.4567cdef.part"  # written before temporaries named their host
    for path in (elsewhere, older_format):
        path.write_text("partial")
    removed = set(remove_stale_temporaries(target))
    assert older_format in removed and not older_format.exists()
    assert elsewhere.exists() and elsewhere not in removed


# ---- output checks -----------------------------------------------------------------------------------------------


def _store(path: Path, name: str, keys: list[str], seed: int, split: str = "test") -> Path:
    store = create_store(path, name, "smp", split, {"name": name}, {0: {"path": f"{name}.pt", "sha256": f"h-{name}"}},
                         images=keys)
    rng = np.random.default_rng(seed)
    for key in keys:
        store.write_image(key, rng.integers(0, 256, (len(CLASSES), 24, 20), dtype=np.uint8))
    return path


@pytest.fixture
def two_stores(tmp_path: Path) -> list[Path]:
    keys = ["ID001/image1", "ID002/image2"]
    return [_store(tmp_path / "a.test.zarr", "a", keys, 0), _store(tmp_path / "b.test.zarr", "b", keys, 1)]


def test_combine_masks_out_never_replaces_an_input_or_a_store_without_overwrite(two_stores, tmp_path: Path) -> None:
    a, b = two_stores
    before = tree_digest(a)
    with pytest.raises(SegensError, match=r"a.test.zarr: --masks-out is one of the inputs .*write to another path"):
        combine([a, b], tmp_path / "x.csv", masks_out=a, overwrite=True, progress=False)
    with pytest.raises(SegensError, match=r"--masks-out lies inside the input .*a.test.zarr"):
        combine([a, b], tmp_path / "x.csv", masks_out=a / "masks", progress=False)
    other = _store(tmp_path / "c.oof.zarr", "c", ["ID001/image1"], 2, split="oof")  # another member's OOF store
    kept = tree_digest(other)
    with pytest.raises(SegensError, match=r"c.oof.zarr: --masks-out exists \(a store\); pass --overwrite"):
        combine([a, b], tmp_path / "x.csv", masks_out=other, progress=False)
    assert tree_digest(a) == before and tree_digest(other) == kept and not (tmp_path / "x.csv").exists()

    combine([a, b], tmp_path / "x.csv", masks_out=other, overwrite=True, progress=False)
    masks = open_store(other)
    assert masks.member == "ensemble" and masks.keys() == ["ID001/image1", "ID002/image2"]


def test_combine_out_is_checked_before_any_work(two_stores, tmp_path: Path) -> None:
    a, b = two_stores
    (tmp_path / "folder").mkdir()
    with pytest.raises(SegensError, match=r"folder: --out is a folder, not a file"):
        combine([a, b], tmp_path / "folder", progress=False)
    with pytest.raises(SegensError, match=r"b.test.zarr: --out is one of the inputs"):
        combine([a, b], b, progress=False, overwrite=True)
    with pytest.raises(SegensError, match=r"masks.zarr: given both as --out and --masks-out"):
        combine([a, b], tmp_path / "masks.zarr", masks_out=tmp_path / "masks.zarr", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SegensError, match=r"cannot be created: .*file is a file, not a folder"):
        combine([a, b], tmp_path / "file" / "sub.csv", progress=False)
    assert not (tmp_path / "masks.zarr").exists() and not any(tmp_path.glob("**/*.part"))

    out = tmp_path / "sub.csv"
    out.write_text("precious")
    out.chmod(0o640)
    with pytest.raises(SegensError, match=r"sub.csv: --out exists; pass --overwrite to replace it"):
        combine([a, b], out, progress=False)
    assert out.read_text() == "precious"
    combine([a, b], out, progress=False, overwrite=True)
    assert out.read_text().startswith("image_name,class,rle\n") and _mode(out) == 0o640


def test_combine_cli_refuses_an_input_as_output_with_exit_code_2(two_stores, tmp_path: Path) -> None:
    a, b = two_stores
    before = tree_digest(b)
    process = subprocess.run([sys.executable, "-m", "segens.cli", "combine", str(a), str(b), "--out",
                              str(tmp_path / "s.csv"), "--masks-out", str(b), "--overwrite"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert process.returncode == 2, process.stderr
    assert "--masks-out is one of the inputs" in process.stderr and "Traceback" not in process.stderr
    assert tree_digest(b) == before and not (tmp_path / "s.csv").exists()


def test_check_outputs_rules(tmp_path: Path) -> None:
    store = _store(tmp_path / "m.zarr", "m", ["ID001/image1"], 0)
    assert is_store(store) and not is_store(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "fold0").mkdir()
    check_outputs([Output(folder, "folder", "--checkpoints", resumable=True)])  # resumed by its writer
    with pytest.raises(SegensError, match=r"ckpt: --checkpoints exists \(a folder\); pass --overwrite"):
        check_outputs([Output(folder, "folder", "--checkpoints")])
    check_outputs([Output(folder, "folder", "--checkpoints")], overwrite=True)
    with pytest.raises(SegensError, match=r"--out holds the input .*m.zarr; replacing it would delete that input"):
        check_outputs([Output(tmp_path, "store")], inputs=[store], overwrite=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("x")
    with pytest.raises(SegensError, match=r"plain: --out is a folder that is not a store; segens never replaces it"):
        check_outputs([Output(tmp_path / "plain", "store", resumable=True)], overwrite=True)
    with pytest.raises(SegensError, match=r"keep.txt: --out is a file, not a store"):
        check_outputs([Output(tmp_path / "plain" / "keep.txt", "store")], overwrite=True)
    check_outputs([Output("s3://bucket/x.zarr", "store")], inputs=["s3://bucket/y.zarr"])
    with pytest.raises(SegensError, match=r"s3://bucket/x.zarr: --out is one of the inputs"):
        check_outputs([Output("s3://bucket/x.zarr", "store")], inputs=["s3://bucket/x.zarr/"])


def test_predict_and_train_member_outputs_are_checked_first(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "csv", "model": {"test": "t.csv"}}))
    (tmp_path / "t.zarr").write_text("a file")
    with pytest.raises(SegensError, match=r"t.zarr: --out is a file, not a store; remove it or choose another path"):
        predict_member(tmp_path / "spec.yaml", "test", tmp_path / "data", tmp_path / "t.zarr", progress=False)
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(SegensError, match=r"ckpt: --checkpoints is a file, not a folder"):
        train_member(tmp_path / "spec.yaml", tmp_path, tmp_path / "folds.json", checkpoints_dir=tmp_path / "ckpt")
    assert (tmp_path / "t.zarr").read_text() == "a file" and (tmp_path / "ckpt").read_text() == "a file"


# ---- search-weights outputs and csv members across splits ---------------------------------------------------------


@pytest.fixture(scope="module")
def csv_project(tmp_path_factory) -> Path:
    """A synthetic data root (64 px) and a csv member whose oof and test CSVs are the labels (the test CSV with
    one class emptied), with both stores predicted."""
    from segens.synth import generate

    base = tmp_path_factory.mktemp("csvmember")
    generate(base / "data", n_train_patients=2, n_test_patients=1, size=64, seed=4)
    for split, name in (("train", "team_oof.csv"), ("test", "team_test.csv")):
        rows = []
        for record in discover(base / "data", split).records:
            masks = read_record_mask(record)
            masks[0] = False
            rows.extend(image_rows(record.name, encode_stack(masks)))
        write_submission(base / name, rows)
    (base / "team.yaml").write_text(yaml.safe_dump({"name": "team", "kind": "csv",
                                                    "model": {"oof": "team_oof.csv", "test": "team_test.csv"}}))
    for split in ("oof", "test"):
        predict_member(base / "team.yaml", split, base / "data", base / f"team.{split}.zarr", progress=False)
    return base


def test_recipe_searched_on_a_csv_members_oof_store_applies_to_its_test_store(csv_project: Path,
                                                                               tmp_path: Path) -> None:
    base = csv_project
    oof, test = open_store(base / "team.oof.zarr"), open_store(base / "team.test.zarr")
    assert oof.checkpoints[0]["sha256"] == test.checkpoints[0]["sha256"]  # one identity for both splits
    assert oof.checkpoints[0]["path"].endswith("team_oof.csv") and test.checkpoints[0]["path"].endswith("team_test.csv")
    recipe = tmp_path / "recipe.json"
    search_weights([str(base / "team.oof.zarr")], base / "data", None, recipe, strategy="soft", postprocess=False,
                   progress=False)
    summary = combine([base / "team.test.zarr"], tmp_path / "sub.csv", "soft", recipe_path=recipe, progress=False)
    assert summary.rows == len(CLASSES) * 2

    # a changed member (its test CSV edited) is another member: its new store no longer matches the recipe
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("team_oof.csv", "team.yaml"):
        (changed / name).write_bytes((base / name).read_bytes())
    lines = (base / "team_test.csv").read_text().splitlines(keepends=True)
    (changed / "team_test.csv").write_text("".join(lines[:2]) + lines[2].split(",")[0] + ",finger-2,\n"
                                           + "".join(lines[3:]))
    predict_member(changed / "team.yaml", "test", base / "data", changed / "team.test.zarr", progress=False)
    with pytest.raises(SegensError, match=r"team.test.zarr: its checkpoints differ from those the recipe was searched on"):
        combine([changed / "team.test.zarr"], tmp_path / "sub2.csv", "soft", recipe_path=recipe, progress=False)


def test_csv_member_identity_needs_every_named_csv(csv_project: Path, tmp_path: Path) -> None:
    (tmp_path / "team_oof.csv").write_bytes((csv_project / "team_oof.csv").read_bytes())
    (tmp_path / "team.yaml").write_bytes((csv_project / "team.yaml").read_bytes())
    with pytest.raises(SegensError, match=r"team_test.csv: CSV of member 'team' \(test\) not found; a csv member's "
                                          r"identity covers every CSV its spec names.*remove model.test"):
        predict_member(tmp_path / "team.yaml", "oof", csv_project / "data", tmp_path / "o.zarr", progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_search_weights_outputs_are_checked_before_the_search(csv_project: Path, tmp_path: Path) -> None:
    stores = [str(csv_project / "team.oof.zarr")]
    (tmp_path / "recipe.json").write_text("{}")
    with pytest.raises(SegensError, match=r"recipe.json: --out exists; pass --overwrite"):
        search_weights(stores, csv_project / "data", None, tmp_path / "recipe.json", progress=False)
    with pytest.raises(SegensError, match=r"team.oof.zarr: --out is one of the inputs"):
        search_weights(stores, csv_project / "data", None, csv_project / "team.oof.zarr", overwrite=True,
                       progress=False)
    (tmp_path / "plot.png").mkdir()
    with pytest.raises(SegensError, match=r"plot.png: --plot is a folder, not a file"):
        search_weights(stores, csv_project / "data", None, tmp_path / "r.json", progress=False,
                       also_written=[Output(tmp_path / "plot.png", option="--plot")])
    (tmp_path / ".r2.json.partial").write_text("not a folder")
    with pytest.raises(SegensError, match=r"\.r2\.json\.partial: --out's resume folder is a file, not a folder"):
        search_weights(stores, csv_project / "data", None, tmp_path / "r2.json", progress=False)
    assert (tmp_path / "recipe.json").read_text() == "{}" and not (tmp_path / "r.json").exists()
    assert [p.name for p in tmp_path.glob(".*.partial")] == [".r2.json.partial"]


def test_selfcheck_replaces_its_earlier_data_set_only_with_overwrite(tmp_path: Path) -> None:
    from segens.demo.selfcheck import run_selfcheck

    run_selfcheck(tmp_path, size=64, progress=False)
    with pytest.raises(SegensError, match=r"data: already holds a data set \(train\).*pass --overwrite to replace it"):
        run_selfcheck(tmp_path, size=64, progress=False)
    assert run_selfcheck(tmp_path, size=64, progress=False, overwrite=True).dice_exact == 1.0
