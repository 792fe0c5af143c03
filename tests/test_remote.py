"""Remote locations against a real S3-protocol server (moto) on 127.0.0.1: staging, mirroring, errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from bit_zoo import remote  # noqa: E402


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


def test_bad_credentials_are_reported_without_the_secret(s3, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-bad")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()

    # moto accepts any key; a store that refuses them answers 403, which s3fs raises as PermissionError
    def refuse(*args, **kwargs):
        raise PermissionError("Access Denied")

    fs, _ = remote._filesystem("s3://any/x")  # fsspec hands the same cached instance to stage()
    monkeypatch.setattr(fs, "info", refuse)
    with pytest.raises(remote.RemoteError) as e:
        remote.stage("s3://any/x")
    assert "access denied" in str(e.value).lower() and "s3cr3t" not in str(e.value)


def test_train_and_validate_with_data_and_outputs_in_a_bucket(s3, tmp_path, monkeypatch):
    """The wiring, as a user on a fresh node: data_url / train_url in the bucket; then validate on an
    empty cache from the bucket's best.ckpt gives the run's own final top-1."""
    import json

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    import train
    import validate

    bucket = _bucket(s3, "job")
    digits = load_digits()
    for split, rows in (("train", range(0, 60)), ("val", range(1700, 1730))):
        for i in rows:
            if digits.target[i] > 2:
                continue
            grey = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            path = tmp_path / f"{split}_{i}.png"
            Image.fromarray(np.stack([grey] * 3, -1)).save(path)
            s3.upload_file(str(path), bucket, f"digits/{split}/{digits.target[i]}/{i}.png")
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node1"))
    common = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "folder", "--data_url", f"s3://{bucket}/digits",
              "--image_size", "32", "--num_workers", "1", "--progress", "false"]  # fmt: skip
    summary = train.main(
        [*common, "--train_url", f"s3://{bucket}/run", "--batch_size", "8", "--steps", "3", "--opt", "sgd", "--lr", "0.01"]
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert {"run/last.ckpt", "run/best.ckpt", "run/metrics.jsonl", "run/summary.json", "run/config.yaml"} <= keys
    uploaded = json.loads(s3.get_object(Bucket=bucket, Key="run/summary.json")["Body"].read())
    assert uploaded["final"]["top1"] == summary["final"]["top1"] and "AWS_SECRET" not in json.dumps(uploaded)

    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "node2"))  # a fresh node: nothing staged yet
    result = validate.main([*common, "--ckpt_path", f"s3://{bucket}/run/best.ckpt"])
    assert result["images"] == summary["final"]["images"] and result["top1"] == summary["final"]["top1"]


def test_convert_from_and_to_a_bucket(s3, tmp_path, make_upstream_npz):
    from safetensors.numpy import load_file

    from bit_zoo import convert

    bucket = _bucket(s3, "weights")
    params = make_upstream_npz(tmp_path / "BiT-S-R50x1.npz", "bit_s_r50x1", 1000)
    s3.upload_file(str(tmp_path / "BiT-S-R50x1.npz"), bucket, "in/BiT-S-R50x1.npz")
    argv = ["--model", "bit_s_r50x1", "--input", f"s3://{bucket}/in/BiT-S-R50x1.npz", "--output", f"s3://{bucket}/out/r50.safetensors"]
    assert convert.main(argv) == 0
    s3.download_file(bucket, "out/r50.safetensors", str(tmp_path / "back.safetensors"))
    back = load_file(str(tmp_path / "back.safetensors"))
    assert np.array_equal(back["stem.conv.weight"], params["stem.conv.weight"])
    assert convert.main(["--model", "bit_s_r50x1", "--input", f"s3://{bucket}/in/missing.npz", "--output", str(tmp_path / "x.ckpt")]) == 2
