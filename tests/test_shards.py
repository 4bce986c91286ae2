"""Reading tar shards by sample index (ssl_distill/data/shards.py, shard_index.py) on real packed images: the same
samples as the folder, every spec form, O(shards) opens, integrity errors, broken members, URLs with a cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import serve_directory
from PIL import Image

from ssl_distill.data.datasets import BrokenImageError, DatasetError, build_image_dataset
from ssl_distill.data.digits import write_digits_folders
from ssl_distill.data.pack import pack_shards
from ssl_distill.data.shard_index import ShardError, expand_braces, is_shard_spec
from ssl_distill.data.shards import ShardDataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """The digits class-folder tree (10 classes x 6 PNGs) and its shards (about 7 images per shard)."""
    root = tmp_path_factory.mktemp("digits")
    train, _ = write_digits_folders(root, 6, 1)
    out = root / "shards"
    pack_shards(train, out, shard_size=24 << 10, workers=0, progress=False)
    return Path(train), out


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def assert_same_samples(folder, shards) -> None:
    assert len(folder) == len(shards)
    assert folder.classes == shards.classes and folder.targets == shards.targets
    for i in range(len(folder)):
        (a, la), (b, lb) = folder[i], shards[i]
        assert la == lb and np.array_equal(pixels(a), pixels(b)), i


def test_shards_give_the_folders_samples_in_the_folders_order(digits):
    train, out = digits
    folder, shards = build_image_dataset(train), build_image_dataset(out)
    assert isinstance(shards, ShardDataset) and len(shards.shard_list.shards) > 5
    assert len(shards.classes) == 10
    assert_same_samples(folder, shards)


def test_every_spec_form_names_the_same_shards(digits):
    train, out = digits
    n = len(json.loads((out / "index.json").read_text())["shardlist"])
    pattern = str(out / f"shard-{{000000..{n - 1:06d}}}.tar")
    ref = build_image_dataset(out)
    for spec in (str(out / "index.json"), pattern):
        ds = build_image_dataset(spec)
        assert ds.targets == ref.targets and ds.classes == ref.classes, spec
    one = build_image_dataset(out / "shard-000001.tar")  # one shard: its samples, the packer's class names
    start = len(np.load(out / "shard-000000.idx.npy"))
    assert one.classes == ref.classes
    assert np.array_equal(pixels(one[0][0]), pixels(ref[start][0])) and one[0][1] == ref[start][1]
    # a folder of .tar files without the index: scanned from the tar headers, labels from the .cls members
    bare = out.parent / "bare"
    bare.mkdir()
    for p in out.glob("*.tar"):
        shutil.copy(p, bare / p.name)
    scanned = build_image_dataset(bare)
    assert scanned.targets == ref.targets and scanned.classes == [str(c) for c in range(10)]
    assert np.array_equal(pixels(scanned[7][0]), pixels(ref[7][0]))


def test_brace_expansion_and_spec_detection(tmp_path):
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/s-{1..2}.tar") == ["x/s-1.tar", "x/s-2.tar", "y/s-1.tar", "y/s-2.tar"]
    with pytest.raises(DatasetError, match=r"FIRST <= LAST"):
        expand_braces("s-{9..1}.tar")
    (tmp_path / "imgs").mkdir()
    assert not is_shard_spec(tmp_path / "imgs") and is_shard_spec("https://host/train-{0..9}.tar")
    with pytest.raises(ShardError, match=r"3 of the 3 shards of .* do not exist"):
        build_image_dataset(str(tmp_path / "s-{0..2}.tar"))


def test_random_access_opens_each_shard_once_and_reads_only_the_member(digits, monkeypatch):
    """An epoch in random order: one open per shard (not per image), and each read is one header + one image."""
    _, out = digits
    ds = build_image_dataset(out)
    opened, reads = [], []
    real_open, real_pread = os.open, os.pread
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    for i in order + order:
        ds[i]
    shards = len(ds.shard_list.shards)
    assert len(opened) == shards == len(set(opened))
    largest = max(os.path.getsize(p) for p in out.glob("*.tar"))
    assert len(reads) == 2 * len(ds) and max(reads) < largest / 4
    ds.close()


def test_at_most_max_open_shards_stay_open(digits):
    train, out = digits
    ds = ShardDataset(build_image_dataset(out).shard_list, max_open=2)
    folder = build_image_dataset(train)
    for i in np.random.default_rng(1).permutation(len(ds)).tolist():
        assert np.array_equal(pixels(ds[i][0]), pixels(folder[i][0]))
        assert len(ds._fds) <= 2


def _copy(out: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_a_truncated_shard_is_one_error_naming_it(digits, tmp_path, policy):
    copy = _copy(digits[1], tmp_path)
    shard = copy / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    ds = build_image_dataset(copy, bad_image_policy=policy)
    start = sum(len(np.load(copy / f"shard-00000{i}.idx.npy")) for i in range(2))
    ds[0]  # other shards read fine
    with pytest.raises(ShardError, match=r"shard-000002\.tar' is 3000 bytes but its index records \d+: it is "
                                         r"truncated .*ssl-distill shards"):
        ds[start]


def test_corrupted_member_bytes_and_a_misplaced_header_name_the_shard(digits, tmp_path):
    copy = _copy(digits[1], tmp_path)
    table = np.load(copy / "shard-000001.idx.npy").tolist()
    start = len(np.load(copy / "shard-000000.idx.npy"))
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    name, _, offset, size, _, _ = table[1]
    name = name.decode()
    data[offset + size // 2] ^= 0xFF  # one flipped byte inside the second image
    header = table[2][1]
    data[header: header + 8] = b"garbage!"  # the third member's header overwritten
    shard.write_bytes(bytes(data))
    ds = build_image_dataset(copy, bad_image_policy="skip")
    ds[start]
    with pytest.raises(ShardError, match=rf"shard-000001\.tar' is corrupted: member '{name}' .* fails its crc32"):
        ds[start + 1]
    with pytest.raises(ShardError, match=r"shard-000001\.tar' is corrupted: member .* (no valid tar header|is not at)"):
        ds[start + 2]


def _foreign_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar written by plain ``tarfile`` (as webdataset's writers make them), no member table."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_member_that_does_not_decode_follows_the_policy(tmp_path, caplog):
    shard = _foreign_shard(tmp_path / "web-000.tar", [
        ("a.png", _png(10)), ("a.cls", b"0"), ("b.jpg", b"not a jpeg at all"), ("b.cls", b"1"),
        ("c.png", _png(30)), ("c.cls", b"1")])
    skip = build_image_dataset(shard, bad_image_policy="skip", return_broken_flag=True)
    assert skip.classes == ["0", "1"] and skip.targets == [0, 1, 1]
    img, label, substituted = skip[1]
    assert pixels(img)[0, 0, 0] == 30 and label == 1 and substituted == 1
    assert "web-000.tar#b.jpg" in caplog.text and skip.broken_count == 1
    with pytest.raises(BrokenImageError, match=r"cannot decode image '.*web-000\.tar#b\.jpg' \(dataset index 1\)"):
        build_image_dataset(shard, bad_image_policy="error")[1]
    with pytest.raises(DatasetError, match="hold no class labels"):
        build_image_dataset(_foreign_shard(tmp_path / "nolabel.tar", [("a.png", _png(1))]), labelled=True)


def test_shards_over_http_are_cached_and_verified(digits, tmp_path, monkeypatch):
    """A loopback server: the shard list, tables and shards are downloaded once into the cache, then read from it
    (also with the server gone); a shard whose bytes differ from the recorded sha256 is refused."""
    train, out = digits
    monkeypatch.setenv("SSL_DISTILL_HOME", str(tmp_path / "home"))
    served = tmp_path / "www"
    shutil.copytree(out, served / "data")
    folder = build_image_dataset(train)
    with serve_directory(served) as base:
        ds = build_image_dataset(f"{base}/data/index.json")
        assert_same_samples(folder, ds)
        n = len(ds.shard_list.shards)
        pattern = build_image_dataset(f"{base}/data/shard-{{000000..{n - 1:06d}}}.tar")
        assert pattern.targets == folder.targets and pattern.classes == folder.classes
        url = f"{base}/data/index.json"
    cached = list((tmp_path / "home" / "shards").rglob("*.tar"))
    assert len(cached) == n
    offline = build_image_dataset(url)  # the server is gone: everything comes from the cache
    assert np.array_equal(pixels(offline[5][0]), pixels(folder[5][0]))
    victim = served / "data" / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    monkeypatch.setenv("SSL_DISTILL_HOME", str(tmp_path / "home2"))
    with serve_directory(served) as base:
        ds = build_image_dataset(f"{base}/data/index.json")
        with pytest.raises(ShardError, match=r"cannot fetch shard .*shard-000003\.tar: .*sha256"):
            _ = ds.targets


@pytest.mark.slow
def test_eval_knn_and_linear_on_shards_equal_the_folders(tmp_path):
    """`ssl-distill eval-knn` / `eval-linear` on the shards of the digits trees give the folders' results exactly;
    the feature cache tells the two apart, and keeps the shards' key from one run to the next."""
    from ssl_distill.cli import main
    from ssl_distill.eval.features import dataset_fingerprint

    train, val = write_digits_folders(tmp_path / "digits", 6, 3)
    for name, src in (("train", train), ("val", val)):
        pack_shards(src, tmp_path / f"{name}_shards", shard_size=24 << 10, workers=0)
    tiny = ["--pretrained-weights", "random", "--config-file", "configs/tiny_cpu.yaml", "--image-size", "32",
            "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]
    results = {}
    shards = (tmp_path / "train_shards", tmp_path / "val_shards")
    for kind, (t, v) in {"folder": (train, val), "shards": shards}.items():
        data = ["--train-dataset", str(t), "--val-dataset", str(v)]
        assert main(["eval-knn", *data, "--output-dir", str(tmp_path / kind), *tiny, "--nb-knn", "1", "5"]) == 0
        assert main(["eval-linear", *data, "--output-dir", str(tmp_path / kind / "lin"), *tiny, "--epochs", "1",
                     "--batch-size", "16", "--learning-rates", "0.1", "--precomputed-features"]) == 0
        knn = json.loads((tmp_path / kind / "results_eval_knn.json").read_text())
        linear = json.loads((tmp_path / kind / "lin" / "results_eval_linear.json").read_text())
        results[kind] = (knn["results"], knn["classes"], knn["n_train"], linear["heads"])
        assert len(list((tmp_path / "cache").glob("features_*.pt"))) == (2 if kind == "folder" else 4)
    assert results["folder"] == results["shards"]
    assert results["folder"][2] == 60
    first, again = (build_image_dataset(tmp_path / "train_shards") for _ in range(2))
    assert dataset_fingerprint(first) == dataset_fingerprint(again) != dataset_fingerprint(build_image_dataset(train))
