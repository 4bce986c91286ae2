"""End to end: `ssl-distill eval-knn` / `eval-linear` on the digits folders, and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from cli_utils import one_line_error as _error
from eval_fixtures import make_digits_dirs

from ssl_distill.cli import main

TINY = ["--config-file", "configs/tiny_cpu.yaml", "--image-size", "32", "--num-workers", "0"]


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory):
    return make_digits_dirs(tmp_path_factory)


def _common(digits_dirs, out, weights="random"):
    train, val = digits_dirs
    return ["--pretrained-weights", weights, "--train-dataset", str(train), "--val-dataset", str(val),
            "--output-dir", str(out), *TINY]


def test_eval_knn_end_to_end(tmp_path, digits_dirs):
    rc = main(["eval-knn", *_common(digits_dirs, tmp_path / "out"), "--nb-knn", "1", "10",
               "--n-per-class-list", "-1", "2", "--n-tries", "2", "--train-chunk", "16", "--cache-dir",
               str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results_eval_knn.json").read_text())
    assert res["n_train"] == 120
    assert res["n_val"] == 60
    assert res["classes"] == [str(d) for d in range(10)]
    assert set(res["results"]) == {"all", "2-shot"}
    assert set(res["results"]["all"]) == {"k=1", "k=10"}
    for entry in res["results"]["all"].values():
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 100.0
    assert len(list((tmp_path / "cache").glob("features_*.pt"))) == 2  # train and val


@pytest.mark.slow
def test_eval_linear_end_to_end_both_modes(tmp_path, digits_dirs):
    for mode in ([], ["--precomputed-features"]):
        out = tmp_path / f"out{len(mode)}"
        rc = main(["eval-linear", *_common(digits_dirs, out), "--epochs", "2", "--batch-size", "32",
                   "--learning-rates", "0.01", "0.1", *mode])
        assert rc == 0
        res = json.loads((out / "results_eval_linear.json").read_text())
        assert len(res["heads"]) == 8  # 2 lrs x last 1 or 4 blocks x avgpool on/off
        assert {(h["n_blocks"], h["avgpool"]) for h in res["heads"]} == {(1, False), (1, True), (4, False),
                                                                          (4, True)}
        assert res["best"]["top1"] == max(h["top1"] for h in res["heads"])
        head = torch.load(out / "best_linear_head.pth", weights_only=True)
        dim = 192 * (res["best"]["n_blocks"] + int(res["best"]["avgpool"]))
        assert head["state_dict"]["weight"].shape == (10, dim)
        assert head["classes"] == res["classes"]


def test_bad_inputs_give_one_line(tmp_path, digits_dirs, capsys):
    train, val = digits_dirs
    args = _common(digits_dirs, tmp_path / "o")
    missing = [a if a != str(train) else str(tmp_path / "nope") for a in args]
    assert "does not exist" in _error(capsys, ["eval-knn", *missing])
    one = tmp_path / "one"
    shutil.copytree(train / "3", one / "3")
    assert "at least 2 class" in _error(capsys, ["eval-knn", *[a if a != str(train) else str(one) for a in args]])
    odd = tmp_path / "odd_val"
    shutil.copytree(val, odd)
    shutil.copytree(val / "7", odd / "seven")
    assert "'seven'" in _error(capsys, ["eval-knn", *[a if a != str(val) else str(odd) for a in args]])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    assert "cannot read weights file" in _error(capsys, ["eval-linear", *_common(digits_dirs, tmp_path, str(junk))])
    odd_size = [*args, "--image-size", "30"]  # the tiny config's patch size is 8
    for command in ("eval-knn", "eval-linear"):
        assert "--image-size 30 is not a multiple of the model's patch size 8; use 24 or 32" in _error(
            capsys, [command, *odd_size])
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    line = _error(capsys, ["eval-knn", *[a if a != str(tmp_path / "o") else str(blocked / "out") for a in args]])
    assert "Not a directory" in line
    assert "a part of that path is a file" in line


def test_val_labels_follow_train_classes(tmp_path, digits_dirs):
    from ssl_distill.eval.data import load_labelled_datasets

    train, val = digits_dirs
    subset = tmp_path / "val_sub"
    for d in ("2", "9"):
        shutil.copytree(val / d, subset / d)
    tr, va = load_labelled_datasets(str(train), str(subset), None, None)
    assert sorted(set(va.targets)) == [2, 9]
    assert va.classes == tr.classes


def _small_tree(src, dst, classes):
    for name in classes:
        shutil.copytree(src / name, dst / name)
    return dst


def test_an_empty_val_class_folder_is_named_not_silently_left_out(tmp_path, digits_dirs, caplog, capsys):
    """Issue 26 item 8: a val class folder without images used to vanish from the accuracy without a word."""
    train, val = digits_dirs
    small_train = _small_tree(train, tmp_path / "train", ["0", "1", "2", "3"])
    small_val = _small_tree(val, tmp_path / "val", ["0", "1", "2"])
    (small_val / "3").mkdir()  # meant to hold class 3's val images; the copy failed
    args = [a if a not in (str(train), str(val)) else str(small_train if a == str(train) else small_val)
            for a in _common(digits_dirs, tmp_path / "out")]
    with caplog.at_level(logging.WARNING):
        assert main(["eval-knn", *args, "--nb-knn", "1", "--n-tries", "1"]) == 0
    res = json.loads((tmp_path / "out" / "results_eval_knn.json").read_text())
    assert res["classes"] == ["0", "1", "2", "3"] and res["n_val"] == 18
    assert res["untested_classes"] == ["3"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "class folder(s) ['3'] hold no images, so the accuracy leaves them out" in warning
    assert "the 3 of 4 classes that have val images" in warning
    (small_train / "4").mkdir()  # and an empty train folder whose class has val images: the error says why
    shutil.copytree(val / "4", small_val / "4")
    capsys.readouterr()
    line = _error(capsys, ["eval-knn", *args])
    assert "not in --train-dataset" in line and "these folders hold no images: ['4']" in line


def test_a_file_name_that_is_not_utf8_is_evaluated(tmp_path, digits_dirs):
    """Issue 26 item 9: one non-UTF-8 file name crashed both evaluations in the dataset fingerprint."""
    train, val = digits_dirs
    small_train = _small_tree(train, tmp_path / "train", ["0", "1"])
    small_val = _small_tree(val, tmp_path / "val", ["0", "1"])
    first = sorted(os.listdir(small_train / "0"))[0]
    os.rename(os.fsencode(small_train / "0" / first), os.fsencode(small_train / "0") + b"/caf\xe9_\xff.png")
    assert any("\udcff" in name for name in os.listdir(small_train / "0"))  # really not UTF-8
    args = [a if a not in (str(train), str(val)) else str(small_train if a == str(train) else small_val)
            for a in _common(digits_dirs, tmp_path / "out")]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["eval-knn", *args, *cache, "--nb-knn", "1", "--n-tries", "1"]) == 0
    assert main(["eval-linear", *args, *cache, "--epochs", "1", "--learning-rates", "0.1",
                 "--precomputed-features"]) == 0
    for name in ("results_eval_knn.json", "results_eval_linear.json"):
        assert json.loads((tmp_path / "out" / name).read_text())["n_train"] == 24
    assert len(list((tmp_path / "cache").glob("features_*.pt"))) == 2  # the linear probe reused k-NN's features
