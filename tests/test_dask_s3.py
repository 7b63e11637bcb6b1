"""--backend dask against a real Dask LocalCluster (2 worker processes) with stores on S3 (a moto server): the
stores, CSV and recipe are the same as the local backend's, and an unreachable scheduler is a clear error."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_smp_project
from scipy import ndimage
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import NUM_CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.infra import backend as backend_module
from segens.infra.backend import check_backend, parse_storage_options
from segens.members.predict import chunk_batches, predict_member
from segens.search.run import search_weights
from segens.store import create_store, open_store
from segens.store.location import store_options


def require_extra(module: str) -> None:
    """Skip this file when an optional extra is missing, except in CI (environment variable CI set, as CI runs
    do with CI=true), where a missing extra must fail the run instead of silently skipping these tests."""
    if os.environ.get("CI", "").strip().lower() in ("", "0", "false", "no"):
        pytest.importorskip(module)
        return
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"CI is set but {module!r} is missing ({error}); install the test extra: "
                          "pip install -e '.[test]'") from error


for _extra in ("distributed", "s3fs", "moto"):
    require_extra(_extra)

BUCKET = "segens-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def aws_env():
    """Dummy credentials (moto accepts any) for this process and, since it is set first, the worker processes."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
                     "SEGENS_STORAGE_OPTIONS"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield


@pytest.fixture(scope="module")
def s3(aws_env) -> dict:
    """A moto S3 server in a subprocess with one bucket; the storage options that reach it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield {"client_kwargs": {"endpoint_url": endpoint}}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def scheduler(aws_env) -> str:
    """A real LocalCluster: 2 worker processes of 1 thread each (they re-import segens, never this module)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A data root, folds and an smp member whose three fold checkpoints are real (untrained) models."""
    return make_smp_project(tmp_path_factory.mktemp("dask"))


def s3_url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def image_attributes(url: str, key: str, storage_options: dict | None) -> dict:
    """The zarr attributes of one image's array, read with zarr directly."""
    import zarr

    group = zarr.open_group(url, mode="r", storage_options=store_options(url, storage_options), zarr_format=3)
    return group[key].attrs.asdict()


def assert_same_store(local: Path, remote: str, storage_options: dict) -> None:
    ours, theirs = open_store(local), open_store(remote, store_options(remote, storage_options))
    assert ours.attributes == theirs.attributes
    assert ours.keys() == theirs.keys() and ours.keys()
    for key in ours.keys():
        assert np.array_equal(ours.read(key), theirs.read(key)), key
        assert image_attributes(str(local), key, None) == image_attributes(remote, key, storage_options)


@pytest.mark.slow
def test_predict_member_on_dask_into_s3_equals_local(project: Path, s3: dict, scheduler: str) -> None:
    spec, data, folds = project / "unet.yaml", project / "data", project / "folds.json"
    local = predict_member(spec, "oof", data, project / "unet.oof.zarr", folds_path=folds, progress=False)
    remote = predict_member(spec, "oof", data, s3_url("unet.oof.zarr"), folds_path=folds, progress=False,
                            backend="dask", scheduler=scheduler, storage_options=s3)
    assert (local.written, local.skipped) == (remote.written, remote.skipped) == (6, 0)
    assert_same_store(project / "unet.oof.zarr", s3_url("unet.oof.zarr"), s3)
    from distributed import Client

    from segens.members import predict

    with Client(scheduler) as client:  # the models were built on the workers, one member each, none here
        built = client.run(eval, "len(__import__('segens.members.predict', fromlist=['_'])._WORKER_MEMBERS)")
    assert sorted(built.values()) in ([0, 1], [1, 1]) and predict._WORKER_MEMBERS == {}
    again = predict_member(spec, "oof", data, s3_url("unet.oof.zarr"), folds_path=folds, progress=False,
                           backend="dask", scheduler=scheduler, storage_options=s3)
    assert (again.written, again.skipped) == (0, 6)  # resumed: the client sees what the workers wrote


def test_chunks_keep_batches_whole() -> None:
    batches = [[("a", (0,)), ("b", (0,))], [("c", (1,))], [("d", (0,))], [("e", (2,))], [("f", (1,))]]
    chunks = chunk_batches(batches, workers=1)
    assert [batch for chunk in chunks for batch in chunk] == [batches[i] for i in (0, 2, 1, 4, 3)]
    assert len(chunk_batches(batches, workers=2)) == 5 and chunk_batches([], 4) == []


# ---- stores made directly (no model): the same maps locally and on S3 ------------------------------------------


def member_maps(truth: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    """(29, H, W) uint8 'network output' from ground truth: blurred, noisy, small values cut to 0."""
    maps = np.zeros(truth.shape, np.uint8)
    for channel, mask in enumerate(truth):
        soft = ndimage.gaussian_filter(mask.astype(np.float32), blur)
        soft = np.clip(soft + rng.normal(0, noise, soft.shape) * (soft > 0.02), 0, 1)
        soft[soft < 0.03] = 0
        maps[channel] = np.rint(soft * 255).astype(np.uint8)
    return maps


MEMBERS = {"sharp": {"blur": 0.8, "noise": 0.15}, "blurry": {"blur": 2.0, "noise": 0.05}}


@pytest.fixture(scope="module")
def member_stores(project: Path, s3: dict) -> dict[str, tuple[list[str], list[str]]]:
    """split -> (local store paths, S3 store URLs) of two members, identical content (3 of the training images in
    oof: every S3 read is a request to a slow server)."""
    stores: dict[str, tuple[list[str], list[str]]] = {}
    for split, folder in (("oof", "train"), ("test", "test")):
        records = discover(project / "data", folder).records[:3]
        local, remote = [], []
        for seed, (name, settings) in enumerate(MEMBERS.items()):
            rng = np.random.default_rng(seed)
            maps = {record.key: member_maps(read_record_mask(record), rng, **settings) for record in records}
            checkpoints = {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}}
            for location, options in ((str(project / f"{name}.{split}.zarr"), None),
                                      (s3_url(f"{name}.{split}.zarr"), store_options(s3_url(""), s3))):
                store = create_store(location, name, "smp", split, {"name": name}, checkpoints, images=list(maps),
                                     storage_options=options)
                for key, values in maps.items():
                    store.write_image(key, values)
            local.append(str(project / f"{name}.{split}.zarr"))
            remote.append(s3_url(f"{name}.{split}.zarr"))
        stores[split] = (local, remote)
    return stores


def test_combine_on_dask_from_s3_equals_local(project: Path, s3: dict, scheduler: str, member_stores, tmp_path) -> None:
    local, remote = member_stores["test"]
    options = {"strategy": "weighted", "weights": {"sharp": 2.0, "blurry": 1.0}, "threshold": 0.4, "progress": False}
    combine(local, tmp_path / "local.csv", masks_out=tmp_path / "masks.zarr", **options)
    combine(remote, tmp_path / "dask.csv", masks_out=s3_url("masks.zarr"), backend="dask", scheduler=scheduler,
            storage_options=s3, **options)
    assert (tmp_path / "local.csv").read_bytes() == (tmp_path / "dask.csv").read_bytes()
    assert_same_store(tmp_path / "masks.zarr", s3_url("masks.zarr"), s3)
    # the command line, storage options from the environment
    result = CliRunner().invoke(app, ["combine", *remote, "--out", str(tmp_path / "cli.csv"), "--strategy", "hard",
                                      "--backend", "dask", "--scheduler", scheduler],
                                env={"SEGENS_STORAGE_OPTIONS": json.dumps(s3)})
    assert result.exit_code == 0, result.output
    combine(local, tmp_path / "hard.csv", "hard", progress=False)
    assert (tmp_path / "cli.csv").read_bytes() == (tmp_path / "hard.csv").read_bytes()


@pytest.mark.slow
def test_search_weights_on_dask_from_s3_equals_local(project: Path, s3: dict, scheduler: str, member_stores,
                                                     tmp_path) -> None:
    local, remote = member_stores["oof"]
    settings = {"strategy": "weighted", "step": 0.25, "progress": False}
    search_weights(local, project / "data", project / "folds.json", tmp_path / "local.json", **settings)
    search_weights(remote, project / "data", project / "folds.json", tmp_path / "dask.json", backend="dask",
                   scheduler=scheduler, storage_options=s3, **settings)
    ours, theirs = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "dask.json"))
    for recipe in (ours, theirs):
        assert recipe["search"].pop("seconds") >= 0
    assert ours == theirs
    assert len(ours["weights"]) == NUM_CLASSES


# ---- errors ---------------------------------------------------------------------------------------------------


def test_unreachable_scheduler_is_a_clear_error(project: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backend_module, "CONNECT_TIMEOUT_S", 0.5)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SegensError, match=f"cannot reach the Dask scheduler at {address}.*dask scheduler.*dask worker"):
        predict_member(project / "unet.yaml", "test", project / "data", tmp_path / "never.zarr", progress=False,
                       backend="dask", scheduler=address)
    assert not (tmp_path / "never.zarr").exists()  # nothing written before the cluster is reached
    result = CliRunner().invoke(app, ["predict-member", str(project / "unet.yaml"), "--split", "test", "--data",
                                      str(project / "data"), "--out", str(tmp_path / "never.zarr"), "--backend", "dask",
                                      "--scheduler", "nonsense:::"])
    assert isinstance(result.exception, SegensError)
    assert re.search(r"cannot reach the Dask scheduler at nonsense::: .*is it running", str(result.exception)), \
        result.exception
    assert not (tmp_path / "never.zarr").exists()
    with pytest.raises(SegensError, match="needs --scheduler"):
        check_backend("dask", None)
    with pytest.raises(SegensError, match="unknown backend 'ray'"):
        check_backend("ray", None)
    with pytest.raises(SegensError, match="only used with --backend dask"):
        check_backend("local", address)
    with pytest.raises(SegensError, match="JSON object"):
        parse_storage_options("[1, 2]")
    assert parse_storage_options(" ") is None and store_options(tmp_path / "local.zarr", {"anon": True}) is None
