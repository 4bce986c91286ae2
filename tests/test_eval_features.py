"""Feature extraction (order, sharding across 2 ranks, cache) and the evaluation transform."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from eval_fixtures import TensorImages, make_digits_dirs, tiny_backbone
from PIL import Image

from ssl_distill.eval.features import cached_features, extract_features, feature_cache_key, shard_range
from ssl_distill.eval.transforms import make_eval_transform


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory):
    return make_digits_dirs(tmp_path_factory)




def _reference(model, dataset):
    """One image at a time through forward_features / get_intermediate_layers, written out independently."""
    cls, pm = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            x = dataset[i][0][None]
            out = model.forward_features(x)
            cls.append(out["x_norm_clstoken"][0])
            pm.append(out["x_norm_patchtokens"][0].mean(0))
    return torch.stack(cls), torch.stack(pm)


def test_extract_features_in_dataset_order():
    model, ds = tiny_backbone(), TensorImages(11)
    feats = extract_features(model, ds, batch_size=4, n_last_blocks=2)
    assert feats["cls"].shape == (11, 2, 192)
    assert feats["patch_mean"].shape == (11, 192)
    ref_cls, ref_pm = _reference(model, ds)
    torch.testing.assert_close(feats["cls"][:, -1], ref_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["patch_mean"], ref_pm, atol=1e-5, rtol=1e-5)
    assert feats["labels"].tolist() == [i % 3 for i in range(11)]
    first_block = model.norm(model.blocks[0](model.prepare_tokens_with_masks(ds[5][0][None])))[0, 0]
    torch.testing.assert_close(feats["cls"][5, 0], first_block.detach(), atol=1e-5, rtol=1e-5)


def test_shard_ranges_cover_everything_once():
    for n in (0, 1, 5, 11):
        for world in (1, 2, 3):
            covered = [i for r in range(world) for i in shard_range(n, r, world)]
            assert covered == list(range(n))


def _extract_rank(rank, world_size):
    return extract_features(tiny_backbone(), TensorImages(11), batch_size=3, n_last_blocks=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_gather_the_single_process_features(tmp_path):
    single = extract_features(tiny_backbone(), TensorImages(11), batch_size=3, n_last_blocks=2)
    results = run_distributed(_extract_rank, world_size=2, tmp_path=tmp_path)
    for res in results:
        assert torch.equal(res["labels"], single["labels"])
        torch.testing.assert_close(res["cls"], single["cls"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["patch_mean"], single["patch_mean"], atol=1e-5, rtol=1e-5)


def test_cache_hit_skips_compute_and_key_tracks_inputs(tmp_path, digits_dirs):
    from ssl_distill.data.datasets import build_image_dataset

    ds = build_image_dataset(digits_dirs[0], labelled=True)
    t32, t64 = make_eval_transform(32), make_eval_transform(64)
    key = feature_cache_key("w1", ds, t32, 4)
    assert key == feature_cache_key("w1", ds, make_eval_transform(32), 4)
    assert len({key, feature_cache_key("w2", ds, t32, 4), feature_cache_key("w1", ds, t64, 4),
                feature_cache_key("w1", ds, t32, 1)}) == 4
    calls = []

    def compute():
        calls.append(1)
        return {"cls": torch.randn(3, 1, 4), "patch_mean": torch.randn(3, 4), "labels": torch.arange(3)}

    first = cached_features(tmp_path, key, compute)
    second = cached_features(tmp_path, key, compute)
    assert len(calls) == 1
    assert torch.equal(first["cls"], second["cls"])
    (tmp_path / f"features_{key}.pt").write_bytes(b"corrupt")
    cached_features(tmp_path, key, compute)
    assert len(calls) == 2  # a corrupt entry is recomputed


def test_dataset_fingerprint_changes_when_a_file_changes(tmp_path, digits_dirs):
    import shutil

    from ssl_distill.data.datasets import build_image_dataset

    root = tmp_path / "copy"
    shutil.copytree(digits_dirs[1], root)
    before = feature_cache_key("w", build_image_dataset(root, labelled=True), None, 4)
    victim = next((root / "3").iterdir())
    Image.new("RGB", (40, 40), (9, 9, 9)).save(victim)
    assert feature_cache_key("w", build_image_dataset(root, labelled=True), None, 4) != before


def test_eval_transform_resizes_then_centre_crops():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 50, 50))
    out = make_eval_transform(32)(img)
    assert out.shape == (3, 32, 32)
    # shorter side 50 -> round(32 * 256 / 224) = 37 (width 74, red up to x=37); the centre crop starts at x=21
    red = (out[0] > out[1]).float().mean(dim=0)
    assert red[:16].min() == 1
    assert red[18:].max() == 0
