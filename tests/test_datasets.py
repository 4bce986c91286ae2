"""build_image_dataset / ImageDataset on real files: layouts, list files, errors, broken files, modes."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ssl_distill.data.datasets import IMG_EXTENSIONS, BrokenImageError, ImageDataset, build_image_dataset

LOGGER = "ssl_distill.data.datasets"


def write_png(path: Path, value: int, size: int = 8) -> Path:
    """A solid RGB PNG whose red channel is ``value`` (so tests can tell images apart after decoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., 0] = value
    arr[..., 1] = 255 - value
    Image.fromarray(arr).save(path)
    return path


def write_jpeg(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return path


def red(img: Image.Image) -> int:
    return int(np.asarray(img)[0, 0, 0])


def rel(ds: ImageDataset, root: Path) -> list[tuple[str, int]]:
    return [(Path(p).relative_to(root).as_posix(), label) for p, label in ds.samples]


# --------------------------------------------------------------------------------------------- layouts


def test_class_folder_tree(tmp_path):
    write_png(tmp_path / "dog" / "b.png", 1)
    write_png(tmp_path / "dog" / "a.PNG", 2)  # extension case does not matter
    write_jpeg(tmp_path / "cat" / "z.jpg")
    write_png(tmp_path / ".cache" / "x.png", 3)  # hidden folder: ignored
    write_png(tmp_path / "cat" / ".thumb.png", 3)  # hidden file: ignored
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    ds = build_image_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert rel(ds, tmp_path) == [("cat/z.jpg", 0), ("dog/a.PNG", 1), ("dog/b.png", 1)]
    assert ds.targets == [0, 1, 1]
    img, label = ds[2]
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == (8, 8)
    assert (red(img), label) == (1, 1)
    assert ds[-1][1] == 1
    with pytest.raises(IndexError):
        ds[3]


def test_flat_folder_is_unlabelled(tmp_path):
    for name, v in [("c.png", 3), ("a.png", 1), ("b.bmp", 2)]:
        write_png(tmp_path / name, v)
    ds = build_image_dataset(tmp_path)
    assert ds.classes == []
    assert rel(ds, tmp_path) == [("a.png", -1), ("b.bmp", -1), ("c.png", -1)]
    assert [red(ds[i][0]) for i in range(3)] == [1, 2, 3]


def test_nested_folders_are_unlabelled(tmp_path):
    write_png(tmp_path / "2020" / "01" / "a.png", 1)
    write_png(tmp_path / "2020" / "b.png", 2)
    write_png(tmp_path / "2021" / "02" / "c.png", 3)
    ds = build_image_dataset(tmp_path)
    assert ds.classes == []
    assert rel(ds, tmp_path) == [("2020/01/a.png", -1), ("2020/b.png", -1), ("2021/02/c.png", -1)]
    # labelled=True reads the first-level folders as classes, images at any depth below them.
    forced = build_image_dataset(tmp_path, labelled=True)
    assert forced.classes == ["2020", "2021"]
    assert [label for _, label in forced.samples] == [0, 0, 1]


def test_images_at_root_make_it_unlabelled(tmp_path):
    write_png(tmp_path / "top.png", 1)
    write_png(tmp_path / "cls" / "a.png", 2)
    ds = build_image_dataset(tmp_path)
    assert rel(ds, tmp_path) == [("cls/a.png", -1), ("top.png", -1)]
    with pytest.raises(ValueError, match="top.png"):
        build_image_dataset(tmp_path, labelled=True)


def test_labelled_false_ignores_classes(tmp_path):
    write_png(tmp_path / "a" / "x.png", 1)
    write_png(tmp_path / "b" / "y.png", 2)
    ds = build_image_dataset(tmp_path, labelled=False)
    assert ds.classes == []
    assert ds.targets == [-1, -1]


def test_list_file(tmp_path):
    write_png(tmp_path / "imgs" / "b.png", 2)
    write_png(tmp_path / "imgs" / "a.png", 1)
    absolute = write_png(tmp_path / "elsewhere" / "c.png", 3)
    list_file = tmp_path / "lists" / "train.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"# training images\n\n../imgs/b.png\n  ../imgs/a.png  \n{absolute}\n# end\n")
    ds = build_image_dataset(list_file)
    assert ds.classes == []
    assert [os.path.normpath(p) for p, _ in ds.samples] == [
        str(tmp_path / "imgs" / "b.png"),
        str(tmp_path / "imgs" / "a.png"),
        str(absolute),
    ]  # the file's order, relative entries resolved against the list file's folder
    assert [label for _, label in ds.samples] == [-1, -1, -1]
    assert [red(ds[i][0]) for i in range(3)] == [2, 1, 3]


def test_transform_is_applied(tmp_path):
    write_png(tmp_path / "a.png", 7)
    ds = build_image_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    x, label = ds[0]
    assert x.shape == (8, 8, 3)
    assert int(x[0, 0, 0]) == 7
    assert label == -1


# --------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.*does not exist"):
        build_image_dataset(tmp_path / "does_not_exist")


def test_empty_folder_lists_extensions(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_image_dataset(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert all(ext in msg for ext in IMG_EXTENSIONS)


def test_folder_with_only_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hello")
    with pytest.raises(FileNotFoundError) as info:
        build_image_dataset(tmp_path)
    msg = str(info.value)
    assert "readme.txt" in msg
    assert ".jpeg" in msg
    assert ".webp" in msg


def test_list_file_with_missing_entries(tmp_path):
    write_png(tmp_path / "ok.png", 1)
    names = [f"gone{i}.png" for i in range(7)]
    (tmp_path / "list.txt").write_text("ok.png\n" + "\n".join(names) + "\n")
    with pytest.raises(FileNotFoundError) as info:
        build_image_dataset(tmp_path / "list.txt")
    msg = str(info.value)
    assert "7 of 8 entries" in msg
    assert "list.txt" in msg
    assert all(n in msg for n in names[:5])
    assert names[6] not in msg  # names the first few only


def test_empty_list_file(tmp_path):
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(FileNotFoundError, match="lists no paths"):
        build_image_dataset(tmp_path / "list.txt")


def test_image_file_as_path(tmp_path):
    with pytest.raises(ValueError, match="single image"):
        build_image_dataset(write_png(tmp_path / "a.png", 1))


def test_unknown_policy(tmp_path):
    write_png(tmp_path / "a.png", 1)
    with pytest.raises(ValueError, match=r"'skip'.*'error'"):
        build_image_dataset(tmp_path, bad_image_policy="ignore")


# --------------------------------------------------------------------------------------------- broken files


def make_broken(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_jpeg(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a png\n" * 10)
    return path


BROKEN = [("empty", "a1.jpg"), ("truncated", "a1.jpg"), ("text", "a1.png")]


def test_truncated_jpeg_header_still_opens(tmp_path):
    """The truncated file is only caught by a full decode, which is what the dataset must do."""
    path = make_broken(tmp_path / "t.jpg", "truncated")
    with Image.open(path) as img:
        assert img.size == (64, 64)


@pytest.mark.parametrize("kind, name", BROKEN)
def test_error_policy_names_the_file(tmp_path, kind, name):
    write_png(tmp_path / "a0.png", 1)
    broken = make_broken(tmp_path / name, kind)
    ds = build_image_dataset(tmp_path, bad_image_policy="error")
    assert red(ds[0][0]) == 1
    with pytest.raises(BrokenImageError) as info:
        ds[1]
    assert str(broken) in str(info.value)
    assert "train.bad_image_policy=skip" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind, name", BROKEN)
def test_skip_policy_substitutes_warns_once_and_counts(tmp_path, caplog, kind, name):
    write_png(tmp_path / "a0.png", 10)
    broken = make_broken(tmp_path / name, kind)
    write_png(tmp_path / "a2.png", 20)
    ds = build_image_dataset(tmp_path, return_broken_flag=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = [ds[1], ds[1], ds[0], ds[2], ds[1]]
    assert [(red(img), flag) for img, _, flag in results] == [(20, 1), (20, 1), (10, 0), (20, 0), (20, 1)]
    assert sum(str(broken) in r.getMessage() for r in caplog.records) == 1
    assert ds.broken_count == 1


def test_consecutive_broken_and_wrap_around(tmp_path):
    write_png(tmp_path / "a0.png", 10)
    make_broken(tmp_path / "a1.jpg", "empty")
    write_png(tmp_path / "a2.png", 20)
    make_broken(tmp_path / "a3.png", "text")
    make_broken(tmp_path / "a4.jpg", "truncated")
    ds = build_image_dataset(tmp_path, return_broken_flag=True)
    got = [(red(img), flag) for img, _, flag in (ds[i] for i in range(5))]
    # 1 -> 2; 3 -> 4 (broken) -> 0 (wraps around); 4 -> 0.
    assert got == [(10, 0), (20, 1), (20, 0), (10, 1), (10, 1)]
    assert ds.broken_count == 3


def test_all_broken_raises(tmp_path):
    for i in range(3):
        make_broken(tmp_path / f"b{i}.jpg", "empty")
    ds = build_image_dataset(tmp_path)
    with pytest.raises(BrokenImageError, match="all unreadable"):
        ds[0]
    assert ds.broken_count == 3


def test_truncated_counts_even_with_load_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    write_png(tmp_path / "a0.png", 10)
    make_broken(tmp_path / "a1.jpg", "truncated")
    ds = build_image_dataset(tmp_path, return_broken_flag=True)
    img, _, flag = ds[1]
    assert (red(img), flag, ds.broken_count) == (10, 1, 1)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy())


def test_dataloader_workers_report_broken_count(tmp_path):
    n, broken = 40, {7, 30}  # 5% broken
    for i in range(n):
        if i in broken:
            make_broken(tmp_path / f"img{i:02d}.jpg", "empty" if i == 7 else "text")
        else:
            write_png(tmp_path / f"img{i:02d}.png", i)
    ds = build_image_dataset(tmp_path, transform=to_tensor, return_broken_flag=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    total, reds = 0, []
    for images, labels, flags in loader:  # the consumer's side of the contract
        assert flags.dtype == torch.int64
        assert flags.shape == (images.shape[0],)
        assert labels.tolist() == [-1] * images.shape[0]
        total += int(flags.sum())
        reds += images[:, 0, 0, 0].tolist()
    assert total == len(broken)
    assert reds == [i + 1 if i in broken else i for i in range(n)]
    assert ds.broken_count == 0  # the main process decoded nothing: only the flags carry the count


# --------------------------------------------------------------------------------------------- image modes


def test_modes_convert_to_rgb(tmp_path):
    cases = {
        "l.png": (Image.new("L", (4, 4), 77), (77, 77, 77)),
        "la.png": (Image.new("LA", (4, 4), (90, 10)), (90, 90, 90)),
        "rgba.png": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
        "cmyk.tiff": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    }
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    cases["p.png"] = (pal, (200, 100, 50))
    cases["pt.png"] = (pal, (200, 100, 50))  # saved with per-entry alpha (tRNS as bytes)
    for name, (img, _) in cases.items():
        img.save(tmp_path / name, **({"transparency": bytes([0, 128])} if name == "pt.png" else {}))
    ds = build_image_dataset(tmp_path, bad_image_policy="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        got = {Path(p).name: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    for name, (_, rgb) in cases.items():
        assert got[name].mode == "RGB", name
        assert tuple(np.asarray(got[name])[0, 0]) == rgb, name


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    img = build_image_dataset(tmp_path, bad_image_policy="error")[0][0]
    expected = [round(v / 257) for v in [0, 257 * 128, 65535, 1000]]  # 0, 128, 255, 4
    assert img.mode == "RGB"
    assert np.asarray(img)[0].tolist() == [[e, e, e] for e in expected]


def test_float_and_32_bit_images_are_scaled_or_refused(tmp_path, caplog):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32), mode="F").save(good / "float.tiff")
    Image.fromarray(np.array([[0, 257 * 128, 65535, 1000]], dtype=np.int32), mode="I").save(good / "int32.tiff")
    for name in ("float.tiff", "int32.tiff"):
        with Image.open(good / name) as raw:
            assert raw.mode in ("F", "I"), (name, raw.mode)  # really float / 32-bit files
    ds = build_image_dataset(good, bad_image_policy="error")
    got = {Path(p).name: np.asarray(ds[i][0])[0, :, 0].tolist() for i, (p, _) in enumerate(ds.samples)}
    assert got["float.tiff"] == [0, 128, 255, 64]  # v * 255, rounded
    assert got["int32.tiff"] == [0, 128, 255, 4]  # v / 257, as 16-bit
    Image.fromarray(np.array([[0.0, 3.5]], dtype=np.float32), mode="F").save(bad / "float.tiff")
    Image.fromarray(np.array([[0, 1_000_000]], dtype=np.int32), mode="I").save(bad / "int32.tiff")
    strict = build_image_dataset(bad, bad_image_policy="error")
    with pytest.raises(BrokenImageError, match=r"floating-point greyscale image .* values in \[0, 3.5\].*0\.\.1"):
        strict[0]
    with pytest.raises(BrokenImageError, match=r"32-bit greyscale image .* values in \[0, 1e\+06\]"):
        strict[1]
    write_png(bad / "z_ok.png", 9)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        img, _ = build_image_dataset(bad, bad_image_policy="skip")[0]  # both refused, replaced by the PNG
    assert red(img) == 9
    assert sum("greyscale image" in r.getMessage() for r in caplog.records) == 2


_NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
           "-dac_override,-dac_read_search"]
_SCAN = """
import logging, sys
from ssl_distill.data.datasets import BrokenImageError, build_image_dataset
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
try:
    ds = build_image_dataset(sys.argv[1], bad_image_policy=sys.argv[2])
    print("OK", len(ds), ds.classes)
except BrokenImageError as exc:
    print("ERROR", exc)
"""


def test_unreadable_class_folder_is_reported_like_a_broken_image(tmp_path):
    """A class folder the user cannot list is not skipped silently: one warning counting it under ``skip``,
    a clear error under ``error``. Run in a subprocess without the permission-override capabilities, because
    root (as in CI) reads every folder."""
    import subprocess
    import sys

    root = tmp_path / "tree"
    for c in ("cat", "dog", "eel"):
        for i in range(2):
            write_png(root / c / f"{i}.png", 10 * i)
    locked = root / "eel"
    locked.chmod(0)
    prefix = _NO_DAC if os.geteuid() == 0 else []
    try:
        runs = {policy: subprocess.run([*prefix, sys.executable, "-c", _SCAN, str(root), policy],
                                       capture_output=True, text=True, timeout=120) for policy in ("skip", "error")}
    finally:
        locked.chmod(0o755)
    skip, error = runs["skip"], runs["error"]
    assert "OK 4 ['cat', 'dog']" in skip.stdout, skip.stdout + skip.stderr
    assert "1 folder(s) under" in skip.stderr
    assert "eel (Permission denied)" in skip.stderr
    assert "ERROR cannot read 1 folder(s)" in error.stdout, error.stdout
    assert "bad_image_policy=skip" in error.stdout, error.stdout
