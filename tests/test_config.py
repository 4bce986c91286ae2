"""Config layering (defaults -> YAML -> dotlist) and the messages users see for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssl_distill.config import ConfigError, default_config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_dinov2_recipe():
    cfg = default_config()
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_bottleneck_dim, cfg.dino.head_hidden_dim) == (65536, 256, 2048)
    assert cfg.dino.head_nlayers == 3
    assert cfg.ibot.head_nlayers == 3
    assert cfg.dino.koleo_loss_weight == 0.1
    assert list(cfg.ibot.mask_ratio_min_max) == [0.1, 0.5]
    assert cfg.ibot.mask_sample_probability == 0.5
    assert (cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher) == (0.992, 1.0)
    assert (cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp) == (0.04, 0.07)
    assert cfg.teacher.warmup_teacher_temp_epochs == 30
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule) == (0.004, "sqrt_wrt_1024")
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert (cfg.optim.warmup_epochs, cfg.optim.clip_grad, cfg.optim.layerwise_decay) == (10, 3.0, 0.9)
    assert (cfg.optim.patch_embed_lr_mult, cfg.optim.freeze_last_layer_epochs) == (0.2, 1)
    assert list(cfg.crops.global_crops_scale) == [0.32, 1.0]
    assert cfg.crops.global_crops_size == 224
    assert list(cfg.crops.local_crops_scale) == [0.05, 0.32]
    assert cfg.crops.local_crops_size == 96
    assert cfg.crops.local_crops_number == 8
    assert (cfg.student.drop_path_rate, cfg.student.layerscale) == (0.3, 1e-5)
    assert cfg.train.centering == "centering"
    assert cfg.train.iters_per_epoch == 1250


def test_section_names_match_dinov2():
    expected = {"dino", "ibot", "train", "student", "teacher", "optim", "crops", "evaluation"}
    assert set(default_config().keys()) == expected | {"distill"}  # DINOv2's sections, plus distillation's


def test_layering_defaults_then_yaml_then_dotlist(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  epochs: 7\n  base_lr: 0.001\nstudent:\n  arch: vit_small\n")
    cfg = load_config(f, ["optim.epochs=9", "crops.local_crops_number=0", "optim.warmup_epochs=2"])
    assert cfg.optim.epochs == 9  # dotlist beats YAML
    assert cfg.optim.base_lr == 0.001  # YAML beats defaults
    assert cfg.student.arch == "vit_small"
    assert cfg.crops.local_crops_number == 0
    assert cfg.optim.min_lr == 1e-6  # untouched default


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    raw = yaml.safe_load(path.read_text()) or {}
    needs_teacher = raw.get("train", {}).get("mode") == "distill" and not raw.get("distill", {}).get("teacher_weights")
    if needs_teacher:  # a template: the user names the teacher, and is told so when they forget
        with pytest.raises(ConfigError, match="distill.teacher_weights"):
            load_config(path)
    cfg = load_config(path, ["distill.teacher_weights=teacher.pth"] if needs_teacher else [])
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(None, ["optim.epochs=3", "optim.warmup_epochs=1", "train.centering=sinkhorn_knopp"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["train"]["centering"] == "sinkhorn_knopp"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.bas_lr=0.1"], "Unknown config key 'optim.bas_lr'.*Did you mean 'optim.base_lr'"),
        (["crops.globl_crops_size=64"], "Did you mean 'crops.global_crops_size'"),
        (["trian.seed=1"], "Unknown config key 'trian.seed'.*Did you mean 'train.seed'"),
        (["nonsense=1"], "Unknown config key 'nonsense'.*Valid sections"),
        (["optim"], "write overrides as key=value"),
        (["optim.epochs=abc"], "'optim.epochs'.*could not be converted"),
        (["optim.base_lr=-0.1"], "'optim.base_lr'.*must be > 0"),
        (["optim.min_lr=-1"], "'optim.min_lr'"),
        (["optim.lr=-1"], "'optim.lr'.*negative"),
        (["teacher.momentum_teacher=1.5"], "'teacher.momentum_teacher'.*<= 1"),
        (["teacher.final_momentum_teacher=-0.1"], "'teacher.final_momentum_teacher'"),
        (["ibot.mask_ratio_min_max=[0.1,1.2]"], "'ibot.mask_ratio_min_max'.*0.0 <= min <= max <= 1.0"),
        (["ibot.mask_ratio_min_max=[0.6,0.2]"], "'ibot.mask_ratio_min_max'"),
        (["ibot.mask_sample_probability=2"], "'ibot.mask_sample_probability'"),
        (["crops.local_crops_scale=[-0.1,0.3]"], "'crops.local_crops_scale'"),
        (["crops.global_crops_scale=[0,1]"], "'crops.global_crops_scale'.*> 0"),
        (["crops.local_crops_size=256"], "'crops.local_crops_size'.*must not be larger than global"),
        (["crops.global_crops_size=200"], "global_crops_size'.*not a multiple of student.patch_size=16.*192 or 208"),
        (["student.patch_size=14"], "'crops.local_crops_size'.*multiple of student.patch_size=14.*84 or 98"),
        (["student.arch=vit_smal"], "'student.arch'.*Did you mean 'vit_small'"),
        (["train.centering=sinkhorn"], "'train.centering'.*sinkhorn_knopp"),
        (["student.ffn_layer=swish"], "'student.ffn_layer'"),
        (["student.attn_impl=flash"], "'student.attn_impl'"),
        (["optim.scaling_rule=sqrt"], "'optim.scaling_rule'"),
        (["train.batch_size_per_gpu=0"], "'train.batch_size_per_gpu'"),
        (["crops.local_crops_number=-1"], "'crops.local_crops_number'"),
        (["teacher.teacher_temp=0"], "'teacher.teacher_temp'"),
        (["optim.layerwise_decay=0"], "'optim.layerwise_decay'"),
        (["student.depth=-1"], "'student.depth'.*>= 0"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_local_crop_size_unchecked_when_no_local_crops():
    cfg = load_config(None, ["crops.local_crops_number=0", "crops.local_crops_size=256"])
    assert cfg.crops.local_crops_number == 0


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"warmup_epoch'.*unknown.yaml.*Did you mean 'optim.warmup_epochs'"):
        load_config(unknown)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)
    value_as_section = tmp_path / "leaf.yaml"
    value_as_section.write_text("optim:\n  lr:\n    value: 3\n")
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(value_as_section)


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(ConfigError, match="'optim.warmup_epochs'.*exceed optim.epochs=3"):
        load_config(None, ["optim.epochs=3"])


# ---------------------------------------------------------------- descriptions and `ssl-distill config`
def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    return [k for key, v in node.items()
            for k in (_leaf_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def test_every_field_has_a_one_line_description():
    from omegaconf import OmegaConf

    from ssl_distill.config import field_descriptions

    helps = field_descriptions()
    assert sorted(helps) == sorted(_leaf_keys(OmegaConf.to_container(default_config())))
    for key, text in helps.items():
        assert len(text) >= 10, key  # says something
        assert "\n" not in text, key


def _printed_rows(text: str) -> dict[str, str]:
    """Dotted key -> its comment, from the lines of `ssl-distill config`."""
    rows, section = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.rstrip(":")
            continue
        entry, comment = line.split("# ", 1)
        rows[f"{section}.{entry.split(':')[0].strip()}"] = comment
    return rows


def test_config_command_prints_the_merged_config_with_descriptions(capsys):
    from omegaconf import OmegaConf

    from ssl_distill.cli import main
    from ssl_distill.config import field_descriptions

    tiny = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["config", "--config-file", tiny, "optim.epochs=3", "student.layerscale=0.0001"]) == 0
    out = capsys.readouterr().out
    merged = load_config(tiny, ["optim.epochs=3", "student.layerscale=0.0001"])
    assert yaml.safe_load(out) == OmegaConf.to_container(merged)  # valid YAML with exactly the merged values
    rows = _printed_rows(out)
    helps = field_descriptions()
    assert sorted(rows) == sorted(helps)
    defaults = OmegaConf.to_container(default_config())
    tiny_keys = {f"{s}.{k}" for s, sec in yaml.safe_load(Path(tiny).read_text()).items() for k in sec}
    for key, comment in rows.items():
        section, name = key.split(".")
        changed = OmegaConf.select(merged, key) != defaults[section][name]
        assert comment.startswith("* default ") == changed, key
        assert comment.endswith(helps[key]), key
        if key in ("optim.epochs", "student.layerscale"):
            assert changed
    assert rows["optim.epochs"].startswith("* default 100 | ")
    assert rows["student.layerscale"].startswith("* default 1.0e-05 | ")
    assert not rows["optim.base_lr"].startswith("*")
    assert any(rows[k].startswith("*") for k in tiny_keys)


def test_config_command_changed_only_and_errors(capsys):
    from ssl_distill.cli import main

    assert main(["config", "--changed", "optim.epochs=30", "ibot.mask_ratio_min_max=[0.2,0.4]"]) == 0
    rows = _printed_rows(capsys.readouterr().out)
    assert sorted(rows) == ["ibot.mask_ratio_min_max", "optim.epochs"]
    assert rows["ibot.mask_ratio_min_max"].startswith("* default [0.1, 0.5] | ")
    assert main(["config", "--changed"]) == 0
    assert "every value is the default" in capsys.readouterr().out
    assert main(["config", "optim.epochs=0"]) == 2
    assert "'optim.epochs'" in capsys.readouterr().err


def test_student_depth_reaches_the_training_and_evaluation_backbones():
    from ssl_distill.models import backbone_from_config
    from ssl_distill.train.meta_arch import SSLMetaArch

    small = ["student.arch=vit_tiny", "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
             "dino.head_n_prototypes=16", "ibot.head_n_prototypes=16", "dino.head_hidden_dim=32",
             "ibot.head_hidden_dim=32"]
    assert len(backbone_from_config(load_config(None, small)).blocks) == 12  # 0: the architecture's depth
    cfg = load_config(None, [*small, "student.depth=3"])
    meta = SSLMetaArch(cfg)
    assert len(meta.student.backbone.blocks) == len(meta.teacher.backbone.blocks) == 3
    evaluated = backbone_from_config(cfg)
    evaluated.load_state_dict(meta.teacher.backbone.state_dict(), strict=True)
