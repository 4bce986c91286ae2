"""``ssl-distill shards SRC OUT`` (ssl_distill/data/pack.py) on real images: layout, labels, bad images, resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ssl_distill.cli import main
from ssl_distill.data import pack
from ssl_distill.data.datasets import build_image_dataset
from ssl_distill.data.digits import write_digits_folders
from ssl_distill.data.pack import pack_shards, parse_size


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    train, _ = write_digits_folders(tmp_path_factory.mktemp("digits"), 5, 1)
    return Path(train)


def _index(out: Path) -> list[dict]:
    return json.loads((out / "index.json").read_text())["shardlist"]


def test_the_command_packs_a_class_tree_with_workers_and_prints_a_summary(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["shards", str(digits), str(out), "--shard-size", "20KB", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    entries = _index(out)
    assert f"packed 50 images (10 classes) into {len(entries)} shards" in printed
    assert f"train with train.dataset_path={out}" in printed and len(entries) > 3
    assert all(e["filesize"] <= 20 << 10 for e in entries)
    with tarfile.open(out / "shard-000000.tar") as tar:  # WebDataset layout: <key>.png + <key>.cls
        names = tar.getnames()[:4]
        assert names == ["000000000.png", "000000000.cls", "000000001.png", "000000001.cls"]
        assert tar.extractfile("000000000.cls").read() == b"0"
    doc = json.loads((out / "index.json").read_text())
    assert doc["__kind__"] == "wids-shard-index-v1" and doc["ssl_distill"]["classes"] == [str(c) for c in range(10)]
    assert sum(e["nsamples"] for e in entries) == 50


def test_an_unlabelled_list_file_and_the_progress_bar(photo_folder, tmp_path, capsys):
    photos = sorted(Path(photo_folder).iterdir())[:6]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    summary = pack_shards(listing, tmp_path / "out", workers=0, progress=True)
    assert "packing: 100%" in capsys.readouterr().err
    assert summary.images == 6 and summary.classes == [] and summary.shards == 1
    ds = build_image_dataset(tmp_path / "out")
    assert ds.targets == [-1] * 6 and ds.classes == []
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".cls")]
        assert tar.extractfile("000000002.jpg").read() == photos[2].read_bytes()  # the original bytes


def _with_bad_images(digits: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for p in digits.rglob("*.png"):
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        (src / p.parent.name / p.name).write_bytes(p.read_bytes())
    bad = sorted(src.rglob("*.png"))
    bad[3].write_bytes(bad[3].read_bytes()[:40])  # truncated
    bad[20].write_text("not an image")
    return src


def test_bad_images_stop_the_packing_or_are_left_out_and_listed(digits, tmp_path, capsys):
    src = _with_bad_images(digits, tmp_path)
    assert main(["shards", str(src), str(tmp_path / "stop"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot decode image" in err and "--bad-image-policy skip" in err
    assert not list((tmp_path / "stop").glob("*.tar"))
    out = tmp_path / "skip"
    assert main(["shards", str(src), str(out), "--workers", "2", "--bad-image-policy", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "packed 48 images" in printed and "2 unreadable images left out (bad_image_policy=skip)" in printed
    folder = build_image_dataset(src, bad_image_policy="skip")
    good = [i for i in range(50) if i not in (3, 20)]
    shards = build_image_dataset(out)
    assert shards.targets == [folder.targets[i] for i in good]
    assert np.array_equal(np.asarray(shards[3][0]), np.asarray(folder[4][0]))


def test_an_interrupted_run_continues_after_its_last_complete_shard(digits, tmp_path, monkeypatch, capsys):
    """The run stops after its second shard (with the temp file a kill mid-write leaves); the next run keeps the
    two complete shards and writes exactly what an uninterrupted run writes."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    pack_shards(digits, clean, shard_size=8 << 10, workers=0)
    real_commit, calls = pack._ShardWriter.commit, []

    def commit_then_die(self, where):
        if len(calls) == 2:
            (where / f".{self.name}.abc12345.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        calls.append(self.name)
        return real_commit(self, where)

    monkeypatch.setattr(pack._ShardWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        pack_shards(digits, out, shard_size=8 << 10, workers=0)
    monkeypatch.setattr(pack._ShardWriter, "commit", real_commit)
    assert not (out / "index.json").exists() and len(list(out.glob("*.tar"))) == 2
    assert main(["shards", str(digits), str(out), "--shard-size", "8KB", "--workers", "0"]) == 0
    assert "2 shards kept from an interrupted run" in capsys.readouterr().out
    assert _index(out) == _index(clean)
    assert not list(out.glob(".*.tmp"))
    for entry in _index(clean):
        assert (out / entry["url"]).read_bytes() == (clean / entry["url"]).read_bytes()


def test_user_mistakes_are_one_line(digits, tmp_path, capsys):
    out = tmp_path / "out"
    pack_shards(digits, out, shard_size=8 << 10, workers=0)
    other = tmp_path / "other"
    write_digits_folders(other, 2, 1)
    cases = [
        (["shards", str(other / "train"), str(out)], "holds shards packed from another source"),
        (["shards", str(digits), str(out), "--shard-size", "8KB"], None),  # same source: already complete
        (["shards", str(digits), str(tmp_path / "x"), "--shard-size", "lots"], "is not a size like 256MB"),
        (["shards", str(tmp_path / "missing"), str(tmp_path / "y")], "does not exist"),
        (["shards", str(out), str(tmp_path / "z")], "is already shards"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
        else:
            assert code == 2 and message in err and err.count("\n") == 1, err
    assert parse_size("256MB") == 256 << 20 and parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
