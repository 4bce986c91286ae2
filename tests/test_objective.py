"""The self-distillation objective on its own (a small case written out by hand), and checkpoints whose loss centres
use the keys of older versions (top-level ``dino_loss.center``, as main wrote them before issue 28)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_distill.config import load_config
from ssl_distill.losses import PatchWeights, SelfDistillationObjective, StudentOutputs
from ssl_distill.train.arch_base import objective_state, upgrade_model_state
from ssl_distill.train.meta_arch import SSLMetaArch

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
T_TEMP, S_TEMP = 0.5, 0.1


def _ce(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return -(t * torch.log_softmax(s / S_TEMP, dim=-1)).sum()


def test_objective_by_hand():
    """2 global crops of 1 image, K = 3: targets, pairing, DINO and iBOT terms, their weights, the centre."""
    obj = SelfDistillationObjective(3, 3, 0, dino_weight=0.7, ibot_weight=1.3, koleo_weight=0.0)
    assert torch.equal(obj.pair(torch.tensor([[1.0], [2.0]])), torch.tensor([[2.0], [1.0]]))
    cls_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    patch_logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    targets = obj.targets(cls_logits, patch_logits, T_TEMP, torch.randn(2, 4))
    assert targets.dino.shape == (2, 1, 3)
    torch.testing.assert_close(targets.dino.flatten(0, 1), torch.softmax(cls_logits / T_TEMP, -1))  # centre 0
    student = StudentOutputs(torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.3, 0.4]], requires_grad=True), None,
                             torch.randn(2, 4), torch.tensor([[0.3, 0.0, 0.1], [0.0, 0.2, 0.0]]))
    masks = torch.tensor([[True, False, True], [False, False, False]])  # image 0: 2 masked tokens, image 1: none
    total, losses = obj(student, targets, PatchWeights(masks, torch.tensor([0.5, 0.5])))
    p_t = torch.softmax(patch_logits / T_TEMP, -1)
    dino = (_ce(targets.dino[0, 0], student.global_cls[0]) + _ce(targets.dino[1, 0], student.global_cls[1])) / 2
    ibot = (0.5 * _ce(p_t[0], student.patches[0]) + 0.5 * _ce(p_t[1], student.patches[1])) / 2
    torch.testing.assert_close(losses["dino_global_crops_loss"], dino.detach())
    torch.testing.assert_close(losses["ibot_loss"], ibot)
    torch.testing.assert_close(total, 0.7 * dino + 1.3 * ibot)
    assert set(losses) == {"dino_global_crops_loss", "ibot_loss", "total_loss"} and total.requires_grad
    obj.targets(cls_logits, patch_logits, T_TEMP, torch.randn(2, 4))  # applies the first step's centre update
    torch.testing.assert_close(obj.dino_loss.center[0], 0.1 * cls_logits.mean(0))
    torch.testing.assert_close(obj.ibot_patch_loss.center.reshape(-1), 0.1 * patch_logits.mean(0))
    with pytest.raises(ValueError, match="patch weights"):
        obj(student, targets)
    every = PatchWeights.every_patch(2, 4, "cpu")
    assert every.masks.all() and torch.equal(every.weights, torch.full((8,), 0.25))
    with pytest.raises(ValueError, match="train.centering"):
        SelfDistillationObjective(3, 3, 0, centering="softmax")


def _meta() -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(load_config(TINY, ["dino.head_n_prototypes=48", "ibot.head_n_prototypes=40",
                                          "ibot.separate_head=true"]))


def test_a_checkpoint_with_the_old_centre_keys_loads():
    """main before issue 28 wrote the centres as ``dino_loss.center`` / ``ibot_patch_loss.center``: they load into
    ``objective.*`` (resume: every key, strictly), and the centres alone (pretrained heads, distillation)."""
    source = _meta()
    source.objective.dino_loss.center.normal_()
    source.objective.ibot_patch_loss.center.normal_()
    new = source.state_dict()
    old = {k.removeprefix("objective."): v for k, v in new.items()}
    assert {"dino_loss.center", "ibot_patch_loss.center"} <= old.keys()
    assert upgrade_model_state(old).keys() == new.keys() and upgrade_model_state(new).keys() == new.keys()
    target = _meta()
    target.load_state_dict(upgrade_model_state(old))  # strict
    for key, value in new.items():
        assert torch.equal(target.state_dict()[key], value), key
    fresh = _meta()
    for state in (old, new):
        assert sorted(objective_state(state)) == ["dino_loss.center", "ibot_patch_loss.center"]
        assert sorted(fresh.objective.load_centres(objective_state(state))) == sorted(objective_state(state))
        assert torch.equal(fresh.objective.dino_loss.center, source.objective.dino_loss.center)
