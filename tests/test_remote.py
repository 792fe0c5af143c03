"""Remote locations against a real S3-protocol server (moto) on 127.0.0.1: staging, mirroring, errors."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from bit_zoo.tools import remote as remote_tool  # noqa: E402
from bit_zoo.utils import remote  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A boto3 client on the moto server, with the variables bit_zoo reads set as a user would."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    return client


def _bucket(s3, name):
    s3.create_bucket(Bucket=name)
    return name


def test_is_remote():
    assert remote.is_remote("s3://b/k") and remote.is_remote("obs://b/k")
    assert not remote.is_remote("/data/x") and not remote.is_remote("file:///data/x") and not remote.is_remote(None)


def test_stage_folder_once_only_included_files_and_resume(s3):
    bucket = _bucket(s3, "stage")
    files = {"data/train/a/1.png": b"x" * 10, "data/train/b/2.png": b"y" * 20, "data/val/a/3.png": b"z" * 5}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    local = remote.stage(f"s3://{bucket}/data", include=lambda rel: rel.startswith("train/"))
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["train/a/1.png", "train/b/2.png"]
    assert (local / "train/b/2.png").read_bytes() == b"y" * 20
    # an interrupted staging: one file missing, one cut short; the second call completes both
    (local / "train/a/1.png").unlink()
    (local / "train/b/2.png").write_bytes(b"y")
    assert remote.stage(f"s3://{bucket}/data", include=lambda rel: rel.startswith("train/")) == local
    assert (local / "train/a/1.png").read_bytes() == b"x" * 10 and (local / "train/b/2.png").read_bytes() == b"y" * 20
    assert not [p for p in local.rglob(".*part*")]


def _staged_files(local):
    return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_folder_dataset_stages_only_the_split_and_classes_a_run_reads(s3, tmp_path, monkeypatch):
    """ImageNet-style class folders: train.py with classes [3, 1] fetches train/ and val/ of those two
    classes only (no test/, no other class, no stray file); the other classes are empty NOT_STAGED
    folders, so labels, class count and the data fingerprint equal a full local copy's."""
    from bit_zoo._cli import _stage_data
    from bit_zoo.data import sources
    from bit_zoo.data.from_config import DataConfig

    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node"))
    bucket = _bucket(s3, "imnet")
    full = tmp_path / "full"  # the same tree on local disk, for comparison
    per_split = {"train": 3, "val": 2, "test": 2}
    for split, n in per_split.items():
        for c in range(5):
            for i in range(n):
                key = f"ds/{split}/n0{c}/img{i}.JPEG"
                s3.put_object(Bucket=bucket, Key=key, Body=b"x" * (10 + i))
                (full / key).parent.mkdir(parents=True, exist_ok=True)
                (full / key).write_bytes(b"x" * (10 + i))
    s3.put_object(Bucket=bucket, Key="ds/README.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="ds/train/n01/notes.txt", Body=b"not an image")

    data = DataConfig(dataset="imagenet", data_dir=f"s3://{bucket}/ds", classes=[3, 1])
    local = Path(_stage_data(data, "train"))
    assert _staged_files(local) == [
        f"{split}/n0{c}/img{i}.JPEG" for split in ("train", "val") for c in (1, 3) for i in range(per_split[split])
    ]
    assert sorted(p.parent.relative_to(local).as_posix() for p in local.rglob(remote.NOT_STAGED)) == [
        f"{split}/n0{c}" for split in ("train", "val") for c in (0, 2, 4)
    ]
    # what the loader sees: all five classes in label order, images of the two chosen only
    staged_train = sources.select_classes(sources.folder_source(local / "train"), [3, 1])
    local_train = sources.select_classes(sources.folder_source(full / "ds" / "train"), [3, 1])
    assert staged_train.class_names == local_train.class_names == ["n03", "n01"]
    pick = lambda src: np.flatnonzero(src.labels >= 0)  # noqa: E731
    assert sources.fingerprint(staged_train, pick(staged_train)) == sources.fingerprint(local_train, pick(local_train))

    # validate.py on the test split: test/ of those classes; train/ only as empty folders for the label order
    data.split = "test"
    _stage_data(data, "validate")
    assert [f for f in _staged_files(local) if f.startswith("test/")] == [f"test/n0{c}/img{i}.JPEG" for c in (1, 3) for i in range(2)]
    # another run with all classes completes the staging; the markers go
    data.classes = None
    _stage_data(data, "train")
    assert len([f for f in _staged_files(local) if not f.startswith("test/")]) == 5 * (3 + 2)
    assert not [p for p in local.rglob(remote.NOT_STAGED) if not p.parent.as_posix().split("/")[-2] == "test"]


def test_remote_cli_makes_a_bucket_and_uploads_a_folder(s3, tmp_path, capsys):
    """python -m bit_zoo.remote: what the README's object-storage walk-through runs before train.py."""
    for rel, body in {"train/0/a.png": b"a", "train/1/b.png": b"bb", "val/0/c.png": b"ccc", ".hidden": b"x"}.items():
        (tmp_path / "ds" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / rel).write_bytes(body)
    assert remote_tool.main(["mb", "s3://made"]) == 0
    assert remote_tool.main(["upload", str(tmp_path / "ds"), "s3://made/digits"]) == 0
    assert "3 files uploaded to s3://made/digits" in capsys.readouterr().out
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="made")["Contents"])
    assert keys == ["digits/train/0/a.png", "digits/train/1/b.png", "digits/val/0/c.png"]
    assert remote_tool.main(["upload", str(tmp_path / "nothing"), "s3://made/x"]) == 2
    assert remote_tool.main(["upload", str(tmp_path / "ds"), "s3://no-such-bucket/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such file or folder" in err[0] and "s3://no-such-bucket/x" in err[1]


def test_fetch_single_file_and_local_paths_pass_through(s3, tmp_path):
    bucket = _bucket(s3, "fetch")
    s3.put_object(Bucket=bucket, Key="w/best.ckpt", Body=b"weights")
    path = remote.fetch(f"s3://{bucket}/w/best.ckpt")
    assert open(path, "rb").read() == b"weights"
    assert remote.fetch(str(tmp_path / "x.ckpt")) == str(tmp_path / "x.ckpt") and remote.fetch(None) is None


def test_mirror_uploads_finished_files_once_and_restores(s3):
    bucket = _bucket(s3, "out")
    mirror = remote.Mirror(f"s3://{bucket}/run1")
    (mirror.local / "last.ckpt").write_bytes(b"1" * 100)
    (mirror.local / ".last.tmp123.ckpt").write_bytes(b"half")  # a writer's temporary file: never uploaded
    (mirror.local / "metrics.jsonl").write_text("{}\n")
    assert mirror.sync() == ["last.ckpt", "metrics.jsonl"]
    assert mirror.sync() == []  # nothing changed
    (mirror.local / "metrics.jsonl").write_text('{}\n{"step": 2}\n')
    assert mirror.sync() == ["metrics.jsonl"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["run1/last.ckpt", "run1/metrics.jsonl"]
    # a fresh node: an empty local cache finds the remote checkpoint
    (mirror.local / "last.ckpt").unlink()
    fresh = remote.Mirror(f"s3://{bucket}/run1")
    assert fresh.restore("last.ckpt").read_bytes() == b"1" * 100
    assert fresh.restore("best.ckpt") is None


def test_restore_keeps_a_newer_local_copy_and_takes_a_newer_remote_one(s3, tmp_path, monkeypatch):
    """--resume auto on a node that has a local copy: one whose upload failed is newer than the bucket's
    and is kept (the next sync sends it); one the bucket has since replaced (another node continued
    the run) is replaced by the bucket's."""
    bucket = _bucket(s3, "restore")
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node1"))
    mirror = remote.Mirror(f"s3://{bucket}/run")
    (mirror.local / "last.ckpt").write_bytes(b"step 10")
    mirror.sync()
    (mirror.local / "last.ckpt").write_bytes(b"step 20")  # its upload failed: the bucket still has step 10
    again = remote.Mirror(f"s3://{bucket}/run")  # the next job on this node
    assert again.restore("last.ckpt").read_bytes() == b"step 20"
    assert again.sync() == ["last.ckpt"]
    assert s3.get_object(Bucket=bucket, Key="run/last.ckpt")["Body"].read() == b"step 20"
    assert remote.Mirror(f"s3://{bucket}/run").restore("last.ckpt").read_bytes() == b"step 20"  # same file: kept
    s3.put_object(Bucket=bucket, Key="run/last.ckpt", Body=b"step 30")  # another node went on
    assert remote.Mirror(f"s3://{bucket}/run").restore("last.ckpt").read_bytes() == b"step 30"


def test_localize_resume_auto_on_a_fresh_node_brings_back_last_ckpt_and_metrics(s3, tmp_path, monkeypatch):
    """What a resumed run needs before it starts: the bucket's last.ckpt, and metrics.jsonl, to which it
    appends (without it the bucket's record of the steps before the kill would be overwritten)."""
    from bit_zoo._cli import localize
    from bit_zoo.config import Config

    bucket = _bucket(s3, "fresh")
    s3.put_object(Bucket=bucket, Key="run/last.ckpt", Body=b"ckpt")
    s3.put_object(Bucket=bucket, Key="run/metrics.jsonl", Body=b'{"kind": "epoch", "step": 4}\n')
    s3.put_object(Bucket=bucket, Key="run/step_4.ckpt", Body=b"not needed to resume")
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "empty"))
    cfg = Config()
    cfg.data.dataset, cfg.system.output_dir, cfg.checkpoint.resume = "digits", f"s3://{bucket}/run", "auto"
    done = localize(cfg)
    local = Path(cfg.system.output_dir)
    assert local == done.mirror.local and local.is_relative_to(tmp_path / "empty")
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["last.ckpt", "metrics.jsonl"]
    assert (local / "metrics.jsonl").read_bytes() == b'{"kind": "epoch", "step": 4}\n'
    assert done.as_given(cfg).system.output_dir == f"s3://{bucket}/run" and done.outputs(local) == f"s3://{bucket}/run"


def test_missing_bucket_and_key_are_one_line_errors(s3):
    with pytest.raises(remote.RemoteError, match=r"s3://no-such-bucket/data: .*does not exist"):
        remote.stage("s3://no-such-bucket/data")
    bucket = _bucket(s3, "keys")
    with pytest.raises(remote.RemoteError, match=r"s3://keys/missing.ckpt"):
        remote.fetch(f"s3://{bucket}/missing.ckpt")


def test_failed_upload_is_retried_then_reported_and_the_local_copy_kept(s3, monkeypatch):
    bucket = _bucket(s3, "flaky")
    mirror = remote.Mirror(f"s3://{bucket}/run", backoff_s=0.0)
    (mirror.local / "best.ckpt").write_bytes(b"keep me")
    calls = []

    def broken_put(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(mirror.fs, "put_file", broken_put)
    with pytest.raises(remote.RemoteError, match=r"failed after 3 attempts.*local copy is kept") as e:
        mirror.sync()
    assert "\n" not in str(e.value) and len(calls) == 3
    assert (mirror.local / "best.ckpt").read_bytes() == b"keep me"
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # no half object
    monkeypatch.undo()


@pytest.fixture(scope="module")
def s3_auth_endpoint(tmp_path_factory):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys get 403."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    cwd = tmp_path_factory.mktemp("moto_auth")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def _cli_error(capsys, cli, argv) -> tuple[int, str]:
    """(exit code, the one error line); stderr holds nothing else but log records: no traceback of ours
    (the moto server's request log may report a closed capture stream of an earlier test)."""
    code = cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("train.py:", "validate.py:"))]
    assert len(lines) == 1 and not [line for line in err.splitlines() if "RemoteError" in line or "bit_zoo/" in line], err
    return code, lines[0]


def test_bad_credentials_one_line_exit_2_secret_never_shown(s3_auth_endpoint, monkeypatch, tmp_path, capsys):
    """A store that checks keys refuses ours: staging data, fetching a checkpoint and the output_dir each
    end train.py / validate.py with one line and exit 2, naming the fix, never the secret; nothing is written."""
    import fsspec

    import train
    import validate

    for key, value in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3_auth_endpoint, "BIT_ZOO_HOME": str(tmp_path / "home")}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(remote.RemoteError, match=r"access denied: check AWS_ACCESS_KEY_ID") as e:
        remote.stage("s3://any/data")
    assert SECRET not in str(e.value)
    base = ["--model", "resnetv2", "--layers", "1,1,1,1", "--image_size", "16", "--progress", "false"]
    runs = [
        (train.cli, [*base, "--dataset", "folder", "--data_url", "s3://any/digits", "--output_dir", str(tmp_path / "out")]),
        (train.cli, [*base, "--dataset", "digits", "--train_url", "s3://any/run", "--steps", "1", "--batch_size", "8"]),
        (validate.cli, [*base, "--dataset", "digits", "--ckpt_path", "s3://any/run/best.ckpt"]),
    ]
    for cli, argv in runs:
        code, err = _cli_error(capsys, cli, argv)
        assert code == 2 and len(err.splitlines()) == 1 and "access denied" in err, err
        assert SECRET not in err and ACCESS_KEY not in err
    assert not (tmp_path / "out").exists() and not list((tmp_path / "home").rglob("*.ckpt"))


def test_missing_bucket_or_key_one_line_exit_2_before_anything_is_written(s3, monkeypatch, tmp_path, capsys):
    import train
    import validate

    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "home"))
    bucket = _bucket(s3, "present")
    base = ["--model", "resnetv2", "--layers", "1,1,1,1", "--image_size", "16", "--progress", "false"]
    runs = [
        (train.cli, [*base, "--dataset", "folder", "--data_url", "s3://no-such-bucket/digits", "--output_dir", str(tmp_path / "o1")],
         "s3://no-such-bucket/digits"),
        (train.cli, [*base, "--dataset", "folder", "--data_url", f"s3://{bucket}/no/such/prefix", "--output_dir", str(tmp_path / "o2")],
         f"s3://{bucket}/no/such/prefix"),
        (train.cli, [*base, "--dataset", "digits", "--train_url", "s3://no-such-bucket/run", "--steps", "1", "--batch_size", "8"],
         "s3://no-such-bucket/run"),
        (validate.cli, [*base, "--dataset", "digits", "--ckpt_path", f"s3://{bucket}/run/missing.ckpt"], f"s3://{bucket}/run/missing.ckpt"),
    ]  # fmt: skip
    for cli, argv, url in runs:
        code, err = _cli_error(capsys, cli, argv)
        assert code == 2 and len(err.splitlines()) == 1 and url in err and "does not exist" in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # the probe of a writable output_dir is gone too


def test_new_run_refuses_a_remote_output_dir_holding_a_run(s3, monkeypatch, tmp_path, capsys):
    """A fresh node has no local last.ckpt; the bucket's is what protects the previous run."""
    import train

    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "fresh"))
    bucket = _bucket(s3, "taken")
    s3.put_object(Bucket=bucket, Key="run/last.ckpt", Body=b"a previous run")
    argv = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--train_url", f"s3://{bucket}/run", "--steps", "1"]
    code, err = _cli_error(capsys, train.cli, argv)
    assert code == 2 and "holds a previous run" in err and "--resume auto" in err
    assert s3.get_object(Bucket=bucket, Key="run/last.ckpt")["Body"].read() == b"a previous run"


def test_interrupted_multipart_upload_leaves_the_previous_object_whole(s3, monkeypatch):
    """A large checkpoint goes up in parts; the connection drops after part 1 reached the server. The
    bucket still holds the previous last.ckpt, whole; the new one is kept locally and sent by the next sync."""
    import functools

    bucket = _bucket(s3, "parts")
    mirror = remote.Mirror(f"s3://{bucket}/run", backoff_s=0.0)
    (mirror.local / "last.ckpt").write_bytes(b"step 1" * 10)
    assert mirror.sync() == ["last.ckpt"]
    new = np.random.default_rng(0).bytes(11 * 2**20)  # three 5 MiB-or-less parts
    (mirror.local / "last.ckpt").write_bytes(new)
    monkeypatch.setattr(mirror.fs, "put_file", functools.partial(mirror.fs.put_file, chunksize=5 * 2**20))
    call_s3, parts = mirror.fs._call_s3, []

    async def drop_after_first_part(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] > 1:
                raise ConnectionResetError("connection reset by peer")
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "_call_s3", drop_after_first_part)
    assert mirror.sync_soon() == []  # during training: a warning, the run goes on
    with pytest.raises(remote.UploadError, match=r"failed after 3 attempts.*local copy is kept") as e:
        mirror.sync()  # at the end: one line
    assert "\n" not in str(e.value) and 1 in parts and 2 in parts
    assert s3.get_object(Bucket=bucket, Key="run/last.ckpt")["Body"].read() == b"step 1" * 10
    assert (mirror.local / "last.ckpt").read_bytes() == new
    monkeypatch.undo()
    assert mirror.sync() == ["last.ckpt"]  # the connection is back: the next sync sends it
    assert s3.get_object(Bucket=bucket, Key="run/last.ckpt")["Body"].read() == new


def test_upload_failure_at_the_end_is_one_line_and_exit_4(tmp_path, capsys):
    from bit_zoo.utils.runner import EXIT_UPLOAD, run_cli

    def main(argv):
        raise remote.UploadError(
            f"upload of {tmp_path}/best.ckpt to s3://b/run/best.ckpt failed after 3 attempts (x); the local copy is kept"
        )

    assert run_cli(main, [], prog="train.py") == EXIT_UPLOAD == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: upload failed: ") and "local copy is kept" in err and len(err.splitlines()) == 1


def _digits_in_bucket(s3, bucket: str, tmp_path, *, train_rows=range(0, 60), val_rows=range(1700, 1730), top: int = 2) -> None:
    """scikit-learn digits 0..top as PNG class folders s3://bucket/digits/{train,val}/<digit>/<row>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, rows in (("train", train_rows), ("val", val_rows)):
        for i in rows:
            if digits.target[i] > top:
                continue
            grey = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            path = tmp_path / f"{split}_{i}.png"
            Image.fromarray(np.stack([grey] * 3, -1)).save(path)
            s3.upload_file(str(path), bucket, f"digits/{split}/{digits.target[i]}/{i}.png")


SECRET = "bitzoo-FAKE-secret-9f1c2e7a"  # distinctive: searched for in every file and log a run writes
ACCESS_KEY = "AKIABITZOOFAKE42"


def test_train_and_validate_with_data_and_outputs_in_a_bucket(s3, tmp_path, monkeypatch, capfd):
    """The wiring, as a user on a fresh node: data_url / train_url in the bucket; then validate on an
    empty cache from the bucket's best.ckpt gives the run's own final top-1. config.yaml and
    summary.json name the URLs the user gave; the credentials appear in no file, object or log."""
    import json

    import yaml

    import train
    import validate

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    bucket = _bucket(s3, "job")
    _digits_in_bucket(s3, bucket, tmp_path)
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node1"))
    common = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "folder", "--data_url", f"s3://{bucket}/digits",
              "--image_size", "32", "--num_workers", "1", "--progress", "false"]  # fmt: skip
    summary = train.main(
        [*common, "--train_url", f"s3://{bucket}/run", "--batch_size", "8", "--steps", "3", "--opt", "sgd", "--lr", "0.01"]
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert {"run/last.ckpt", "run/best.ckpt", "run/metrics.jsonl", "run/summary.json", "run/config.yaml", "run/curves.png"} <= keys
    assert not [k for k in keys if "/." in k]  # no temporary or bookkeeping file uploaded
    uploaded = json.loads(s3.get_object(Bucket=bucket, Key="run/summary.json")["Body"].read())
    assert uploaded["final"]["top1"] == summary["final"]["top1"] and uploaded["outputs"] == f"s3://{bucket}/run"
    config = yaml.safe_load(s3.get_object(Bucket=bucket, Key="run/config.yaml")["Body"].read())
    assert config["data_dir"] == f"s3://{bucket}/digits" and config["output_dir"] == f"s3://{bucket}/run"

    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node2"))  # a fresh node: nothing staged yet
    result = validate.main([*common, "--ckpt_path", f"s3://{bucket}/run/best.ckpt"])
    assert result["images"] == summary["final"]["images"] and result["top1"] == summary["final"]["top1"]
    assert result["checkpoint"] == f"s3://{bucket}/run/best.ckpt"

    # the secret and the key id: in no object of the bucket, no file either node wrote, no line logged
    out, err = capfd.readouterr()
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert SECRET.encode() not in body and ACCESS_KEY.encode() not in body, key
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        body = path.read_bytes()
        assert SECRET.encode() not in body and ACCESS_KEY.encode() not in body, path
    assert "s3://job/run" in out + err and SECRET not in out + err and ACCESS_KEY not in out + err


def test_convert_from_and_to_a_bucket(s3, tmp_path, make_upstream_npz):
    from safetensors.numpy import load_file

    from bit_zoo.tools import convert

    bucket = _bucket(s3, "weights")
    params = make_upstream_npz(tmp_path / "BiT-S-R50x1.npz", "bit_s_r50x1", 1000)
    s3.upload_file(str(tmp_path / "BiT-S-R50x1.npz"), bucket, "in/BiT-S-R50x1.npz")
    argv = ["--model", "bit_s_r50x1", "--input", f"s3://{bucket}/in/BiT-S-R50x1.npz", "--output", f"s3://{bucket}/out/r50.safetensors"]
    assert convert.main(argv) == 0
    s3.download_file(bucket, "out/r50.safetensors", str(tmp_path / "back.safetensors"))
    back = load_file(str(tmp_path / "back.safetensors"))
    assert np.array_equal(back["stem.conv.weight"], params["stem.conv.weight"])
    assert convert.main(["--model", "bit_s_r50x1", "--input", f"s3://{bucket}/in/missing.npz", "--output", str(tmp_path / "x.ckpt")]) == 2


def test_predict_takes_an_s3_checkpoint_as_validate_does(s3, tmp_path):
    """predict --checkpoint_path s3://... stages the file (it said "weights file not found: s3:/...", a slash lost)."""
    import json

    import bit_zoo
    from conftest import write_train_checkpoint
    from PIL import Image

    from bit_zoo.tools import predict

    bucket = _bucket(s3, "ckpts")
    net = bit_zoo.ResNetV2((1, 1, 1, 1), 1, num_classes=3, eager_jit=False)
    write_train_checkpoint(tmp_path / "best.ckpt", net, class_names=["a", "b", "c"], image_size=32)
    s3.upload_file(str(tmp_path / "best.ckpt"), bucket, "run/best.ckpt")
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "p.json"
    argv = [str(tmp_path / "x.png"), "--checkpoint_path", f"s3://{bucket}/run/best.ckpt", "--output_json", str(out), "--progress", "false"]
    assert predict.main(argv) == 0
    assert json.loads(out.read_text())["predictions"][0]["labels"][0] in ("a", "b", "c")


def _train_process(home, *args: str):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), BIT_ZOO_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, str(root / "train.py"), *args],
        cwd=home.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.heavy
def test_sigkill_then_resume_on_a_fresh_node_from_the_bucket(s3, tmp_path):
    """Heavy: three train.py processes, 244 s on the shared 2-core CPU (checkpoint and upload every 2 steps).

    Data and outputs in the bucket; the run is SIGKILLed after a periodic checkpoint reached the bucket;
    `--resume auto` on another node (an empty cache: nothing staged, no local outputs) continues from the
    bucket's last.ckpt, and every tensor of its final checkpoint equals an uninterrupted run's."""
    import signal
    import time

    import mindspore as ms

    bucket = _bucket(s3, "resume")
    _digits_in_bucket(s3, bucket, tmp_path, train_rows=range(0, 90), val_rows=range(1700, 1720))
    args = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "folder", "--data_dir", f"s3://{bucket}/digits",
            "--image_size", "16", "--num_workers", "1", "--progress", "false", "--batch_size", "8", "--steps", "30",
            "--opt", "sgd", "--lr", "0.01", "--save_interval", "2", "--eval_interval", "0", "--seed", "3"]  # fmt: skip
    reference = _train_process(tmp_path / "ref_node", *args, "--output_dir", f"s3://{bucket}/ref")
    killed = _train_process(tmp_path / "node1", *args, "--output_dir", f"s3://{bucket}/run")

    def remote_steps():
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="run/step_").get("Contents", [])
        return sorted(int(o["Key"][len("run/step_") : -len(".ckpt")]) for o in listed)

    deadline = time.time() + 600
    while not remote_steps() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert remote_steps(), killed.stdout.read()[-3000:]
    (tmp_path / "last_at_kill.ckpt").write_bytes(s3.get_object(Bucket=bucket, Key="run/last.ckpt")["Body"].read())
    at_kill = int(ms.load_checkpoint(str(tmp_path / "last_at_kill.ckpt"))["state.step"].asnumpy())
    assert 2 <= at_kill < 30, f"killed at step {at_kill}: not mid-run"

    resumed = _train_process(tmp_path / "node2", *args, "--output_dir", f"s3://{bucket}/run", "--resume", "auto")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert f"at step {at_kill}/30" in log  # "resumed <last.ckpt> at step N/30"
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

    def tensors(prefix):
        path = tmp_path / f"{prefix}_last.ckpt"
        path.write_bytes(s3.get_object(Bucket=bucket, Key=f"{prefix}/last.ckpt")["Body"].read())
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}

    ref, got = tensors("ref"), tensors("run")
    assert int(got["state.step"]) == 30 and ref.keys() == got.keys()
    differ = [k for k in ref if not np.array_equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ after resume, e.g. {differ[:5]}"
    # the bucket holds the whole run: metrics of the steps before the kill and after, the summary
    import json

    records = [json.loads(line) for line in s3.get_object(Bucket=bucket, Key="run/metrics.jsonl")["Body"].read().splitlines()]
    epochs = [r["step"] for r in records if r["kind"] == "epoch"]
    ref_records = [json.loads(line) for line in s3.get_object(Bucket=bucket, Key="ref/metrics.jsonl")["Body"].read().splitlines()]
    assert epochs == [r["step"] for r in ref_records if r["kind"] == "epoch"] and epochs[-1] == 30
    summary = json.loads(s3.get_object(Bucket=bucket, Key="run/summary.json")["Body"].read())
    assert summary["steps"] == 30 and summary["outputs"] == f"s3://{bucket}/run"


def _escape_key(prefix: str, target: Path) -> str:
    """A key that, joined naively onto any staging folder, lands on `target` (extra '..' stop at /)."""
    return prefix + "../" * 40 + str(target).lstrip("/")


def test_stage_refuses_object_names_that_lead_out_of_the_cache(s3, tmp_path):
    """A bucket writer must not choose where bit_zoo writes: '..', absolute names and symlinks out are refused
    in one line naming the object, before anything is downloaded (the issue's key, through the CIFAR filter)."""
    bucket = _bucket(s3, "evil")
    outside = tmp_path / "outside"
    s3.put_object(Bucket=bucket, Key="cifar/data_batch_1.bin", Body=b"d" * 8)
    s3.put_object(Bucket=bucket, Key=_escape_key("cifar/", outside / "x" / "PROOF.bin"), Body=b"p")
    cifar_files = lambda rel: rel.endswith((".bin", ".txt"))  # noqa: E731 - _cli's CIFAR selection
    with pytest.raises(remote.RemoteError) as e:
        remote.stage(f"s3://{bucket}/cifar", include=cifar_files)
    message = str(e.value)
    assert "\n" not in message and "PROOF.bin" in message and "outside" in message and f"s3://{bucket}/cifar/" in message
    assert not outside.exists()
    assert not (remote.local_cache(f"s3://{bucket}/cifar") / "data_batch_1.bin").exists()  # refused before any download

    # a class folder's selection sees the same listing: the check is in stage, under every selection
    bucket2 = _bucket(s3, "evil2")
    s3.put_object(Bucket=bucket2, Key="data/train/a/1.png", Body=b"x")
    s3.put_object(Bucket=bucket2, Key=_escape_key("data/train/a/", outside / "y.png"), Body=b"p")
    with pytest.raises(remote.RemoteError, match="y.png"):
        remote.stage(f"s3://{bucket2}/data", select=lambda rels: (rels, []))
    assert not outside.exists()


def test_stage_refuses_a_symlink_in_the_cache_that_leads_out(s3, tmp_path):
    bucket = _bucket(s3, "link")
    s3.put_object(Bucket=bucket, Key="data/sub/f.bin", Body=b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    local = remote.local_cache(f"s3://{bucket}/data")
    local.mkdir(parents=True)
    (local / "sub").symlink_to(outside)  # left by anything that could write into the cache
    with pytest.raises(remote.RemoteError, match="symlink"):
        remote.stage(f"s3://{bucket}/data")
    assert list(outside.iterdir()) == []


def test_a_url_with_dot_dot_is_refused_before_staging(s3, tmp_path):
    with pytest.raises(remote.RemoteError, match=r"\.\."):
        remote.local_cache("s3://bucket/" + "../" * 8 + "x")
