"""hub.resolve: weights arguments (our checkpoints, exported / official state dicts, zoo names, random) to
backbones, with strict-load diagnostics."""

from __future__ import annotations

import pytest
import torch

from ssl_distill.config import config_to_yaml, load_config
from ssl_distill.hub import HubError as WeightsError
from ssl_distill.hub import resolve_backbone as load_pretrained_backbone
from ssl_distill.models import backbone_from_config
from ssl_distill.train.checkpoint import export_backbone, save_checkpoint

TINY = "configs/tiny_cpu.yaml"


def _tiny_state(cfg_overrides=()):
    torch.manual_seed(3)
    cfg = load_config(TINY, list(cfg_overrides))
    return cfg, backbone_from_config(cfg).state_dict()


def test_training_checkpoint_uses_its_config_and_teacher(tmp_path):
    cfg, sd = _tiny_state(["student.num_register_tokens=2"])
    model = {f"teacher.backbone.{k}": v for k, v in sd.items()}
    model.update({f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()})
    path = save_checkpoint(tmp_path, {"iteration": 5, "model": model, "config": config_to_yaml(cfg)})
    backbone, info = load_pretrained_backbone(str(path))  # no --config-file: the stored config has registers
    assert info["source"] == "checkpoint"
    assert backbone.num_register_tokens == 2
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    exported = export_backbone(path, tmp_path / "backbone.pth")
    again, info2 = load_pretrained_backbone(str(exported), TINY, ["student.num_register_tokens=2"])
    assert info2["source"] == "state_dict"
    assert info2["weights_hash"] == info["weights_hash"]


def test_register_mismatch_names_the_fix(tmp_path):
    _, sd = _tiny_state(["student.num_register_tokens=4"])
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*register_tokens.*student.num_register_tokens=4"):
        load_pretrained_backbone(str(tmp_path / "w.pth"), TINY)


def test_swiglu_and_patch_size_mismatches_name_the_fix(tmp_path):
    _, sd = _tiny_state(["student.ffn_layer=swiglufused"])
    torch.save(sd, tmp_path / "swiglu.pth")
    with pytest.raises(WeightsError, match="student.ffn_layer=swiglufused"):
        load_pretrained_backbone(str(tmp_path / "swiglu.pth"), TINY)
    _, sd = _tiny_state(["student.patch_size=16"])
    torch.save(sd, tmp_path / "p16.pth")
    with pytest.raises(WeightsError, match="student.patch_size=16"):
        load_pretrained_backbone(str(tmp_path / "p16.pth"), TINY)


def test_wrong_or_missing_files(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_pretrained_backbone(str(tmp_path / "notes.pth"), TINY)
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        load_pretrained_backbone(str(tmp_path / "meta.pth"), TINY)
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained_backbone(str(tmp_path / "missing.pth"), TINY)


def test_unknown_name_is_explained():
    import importlib.util

    has_zoo = importlib.util.find_spec("ssl_distill.hub.registry") is not None
    expected = "not a usable model-zoo name" if has_zoo else "no model zoo"
    with pytest.raises(WeightsError, match=expected):
        load_pretrained_backbone("dinov2_vitq99")


def test_random_weights_are_seeded_and_hashed():
    # seeded by train.seed, not by whatever the caller's RNG holds, so a "random" baseline is reproducible
    torch.manual_seed(0)
    a, ia = load_pretrained_backbone("random", TINY)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(5)
    _, ib = load_pretrained_backbone("random", TINY)
    _, ic = load_pretrained_backbone("random", TINY, ["train.seed=1"])
    _, id_ = load_pretrained_backbone("random", TINY, seed=1)  # the eval commands' --seed
    assert ia["weights_hash"] == ib["weights_hash"] != ic["weights_hash"] == id_["weights_hash"]
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG stream is left where it was
    assert not a.training
    assert not any(p.requires_grad for p in a.parameters())


def test_unsafe_pickles_and_garbage_get_complete_messages(tmp_path, capsys):
    """A file with Python objects is refused by weights_only loading; the message keeps the warning about arbitrary
    code and says what to do (not cut mid-sentence); a local garbage file is not told to "download again"."""
    import argparse

    from ssl_distill.cli import main

    unsafe = tmp_path / "with_objects.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(WeightsError, match=r"holds Python objects besides tensors \(argparse.Namespace\).*arbitrary "
                                           r"code.*Only if you trust its source.*weights_only=False.*then use that "
                                           r"file\.$"):
        load_pretrained_backbone(str(unsafe), TINY)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    for path, expected in ((unsafe, "arbitrary code"), (garbage, "is it a complete PyTorch (.pth) or safetensors")):
        assert main(["convert", str(path), str(tmp_path / "out.pth")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "download it again" not in err[0], err
