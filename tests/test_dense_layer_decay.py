"""Layer-wise lr decay ids per backbone family: stage-level ids for hierarchical timm towers (fastvit_mci, ConvNeXt,
Swin), mmseg's per-block ids for ViTs, the per-family default, and the min_lr_scale floor."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch
from dense_files import write_ade

from clipdense.cli import main as cli_main
from clipdense.config import ConfigError, load_config
from clipdense.dense.backbones import create_backbone
from clipdense.dense.base_config import BackboneConfig
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.optim import (
    DEFAULT_LAYER_DECAY,
    LayerIds,
    hierarchical_layer_ids,
    layer_decay_param_groups,
    share_ids,
)
from clipdense.dense.tasks.seg.config import SegFinetune
from clipdense.dense.tasks.seg.head import SegModel


def mmseg_convnext_layer_id(name: str, max_layer_id: int = 12) -> int:
    """mmseg's get_layer_id_for_convnext (layer_wise), restated for timm's ConvNeXt names: mmseg's
    downsample_layers.0 is timm's stem, downsample_layers.s timm's stages.s.downsample, stages.s.j timm's
    stages.s.blocks.j."""
    if name.startswith("stem"):
        return 0
    m = re.match(r"stages\.(\d+)\.downsample", name)
    if m:
        return {1: 2, 2: 3, 3: max_layer_id}[int(m.group(1))]
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)", name)
    if m:
        s, j = int(m.group(1)), int(m.group(2))
        return {0: 1, 1: 2, 2: 3 + j // 3, 3: max_layer_id}[s]
    return max_layer_id + 1


def test_share_ids_proportional_with_at_least_one_per_stage():
    assert share_ids([3, 3, 27, 3]) == [1, 1, 9, 1]  # ConvNeXt-B, as mmseg's table
    assert share_ids([2, 6, 10, 2]) == [1, 4, 6, 1]  # fastvit_mci0
    assert share_ids([4, 12, 24, 4]) == [1, 3, 7, 1]  # fastvit_mci2
    assert share_ids([2, 2, 6, 2]) == [2, 2, 6, 2]  # Swin-T: 12 blocks, one id each
    assert share_ids([1, 1, 1, 1]) == [1, 1, 1, 1]
    for depths in ([1, 1, 40, 1], [2, 2, 18, 2], [3, 4, 6, 3], [1, 30], [5]):
        n = share_ids(depths)
        assert sum(n) == min(12, sum(depths)) and all(1 <= k <= d for k, d in zip(n, depths)), (depths, n)


def test_convnext_b_ids_are_mmseg_layer_wise():
    """A ConvNeXt-B layout (3, 3, 27, 3) at toy width: every parameter's id equals mmseg's ConvNeXt table."""
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(depths=(3, 3, 27, 3), dims=(8, 16, 32, 64), num_classes=0)
    ids, head = hierarchical_layer_ids(model)
    assert head == 13
    names = [n for n, _ in model.named_parameters()]
    wrong = [(n, ids.get(n, head), mmseg_convnext_layer_id(n)) for n in names
             if ids.get(n, head) != mmseg_convnext_layer_id(n)]
    assert not wrong


def test_swin_tiny_layout_one_id_per_block():
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=64, patch_size=4, window_size=2, embed_dim=8, depths=(2, 2, 6, 2),
                            num_heads=(1, 1, 1, 1), num_classes=0)
    ids, head = hierarchical_layer_ids(model)
    assert head == 13 and ids["patch_embed.proj.weight"] == 0
    blocks = sorted({(int(s), int(b)) for n in ids for s, b in re.findall(r"^layers\.(\d+)\.blocks\.(\d+)\.", n)})
    assert [ids[f"layers.{s}.blocks.{b}.mlp.fc1.weight"] for s, b in blocks] == list(range(1, 13))
    assert ids["layers.2.downsample.reduction.weight"] == ids["layers.2.blocks.0.mlp.fc1.weight"] == 5


@pytest.fixture(scope="module")
def mci0():
    return create_backbone(BackboneConfig(name="fastvit_mci0"))  # timm, random init (no weights needed)


def test_fastvit_mci0_stage_level_ids_and_auto_decay(mci0):
    table = LayerIds(mci0)
    assert table.family == "hierarchical" and table.head == 13
    by_prefix = defaultdict(set)
    for name, i in table.ids.items():
        parts = name.split(".")
        by_prefix[".".join(parts[1:3]) if parts[1] == "stages" else parts[1]].add(i)
    assert by_prefix["stem"] == {0}
    assert by_prefix["stages.0"] == {1}  # 2 blocks, 1 id
    assert by_prefix["stages.1"] == {2, 3, 4, 5}  # 6 blocks, 4 ids
    assert by_prefix["stages.2"] == set(range(6, 12))  # 10 blocks, 6 ids
    assert by_prefix["stages.3"] == {12}  # 2 blocks + downsample + pos_emb, 1 id
    ordered = [table(n) for n, _ in mci0.named_parameters()]
    assert ordered == sorted(ordered)  # ids rise with depth

    model = SegModel(mci0, num_classes=3, channels=16, aux_channels=8)
    groups = layer_decay_param_groups(model, mci0, weight_decay=0.05, layer_decay="auto", min_lr_scale=1e-3)
    assert len({g["layer_id"] for g in groups}) == 14  # stem, 12 stage ids, head (was 22 timm groups)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    stem = scale["backbone.model.stem.0.conv_kxk.0.conv.weight"]
    assert stem == pytest.approx(DEFAULT_LAYER_DECAY["hierarchical"] ** 13)
    assert scale["backbone.model.stages.3.blocks.1.layer_scale_2.gamma"] == pytest.approx(0.9)
    assert scale["decode_head.classifier.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)


def test_vit_auto_decay_is_mmseg_mae():
    bb = create_backbone(BackboneConfig(name="clip-tiny"))
    groups = layer_decay_param_groups(bb, bb, 0.05, "auto")
    assert LayerIds(bb).family == "vit"
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.65 ** 3)  # 2 blocks: ids 0..3
    assert {g["lr_scale"] for g in layer_decay_param_groups(bb, bb, 0.05, None)} == {1.0}


def test_layer_decay_config_values():
    assert SegFinetune().train.optim.layer_decay == "auto" and SegFinetune().train.optim.min_lr_scale == 1e-3
    assert load_config(FinetuneConfig, None, ["train.optim.layer_decay=0.8"]).train.optim.layer_decay == 0.8
    assert load_config(FinetuneConfig, None, ["train.optim.layer_decay=null"]).train.optim.layer_decay is None
    for bad in ("fast", "0", "1.5"):
        with pytest.raises(ConfigError, match="layer_decay"):
            load_config(FinetuneConfig, None, [f"train.optim.layer_decay={bad}"])


def test_scale_below_floor_is_a_one_line_config_error(tmp_path, capsys):
    """clip-tiny (head id 3) at decay 0.05: stem scale 1.25e-4 < 1e-3, refused before any training step."""
    bb = create_backbone(BackboneConfig(name="clip-tiny"))
    with pytest.raises(ConfigError, match=r"layer_decay 0.05 .* lr scale 0.000125 < train.optim.min_lr_scale 0.001"):
        layer_decay_param_groups(bb, bb, 0.05, 0.05, min_lr_scale=1e-3)
    layer_decay_param_groups(bb, bb, 0.05, 0.05, min_lr_scale=1e-4)  # a lower floor lets it through

    root = tmp_path / "ade"
    write_ade(root, n_train=4, n_val=1, size=(32, 32), num_classes=3)
    rc = cli_main(["finetune", f"data.root={root}", f"out_dir={tmp_path / 'run'}", "data.num_classes=3",
                   "data.batch_size=2", "head.channels=16", "head.aux_channels=8", "train.optim.layer_decay=0.05",
                   "train.schedule.total_steps=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "min_lr_scale" in err and "0.05" in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()
