"""loss.distill: DataCompDR's distillation (pretrain/distill.py) on a fixture in the exact DataCompDR format.

The fixture is a DataComp image shard (img2dataset layout) + a DataCompDR shard (url.txt, syn.json, paug.json with
views drawn as DataCompDR's generator draws them, npz teacher embeddings, json uid/sha256), joined by the real
join. The batch is what the decode ships once it keeps whole images (`pixels` per row at any size, `orig_w`,
`orig_h`); one row is decoded at half size (JPEG draft), as the draft-reduced decode does.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageDraw

from clipdense.config import ConfigError, DataError, build_config
from clipdense.data.images import decode_rgb
from clipdense.data.layouts import datacompdr_shard, img2dataset_shard
from clipdense.data.shards import SCHEMA, read_shard_local
from clipdense.data.storage import Storage
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.captions import pick_batch
from clipdense.pretrain.data import join_recaptions
from clipdense.pretrain.dr_views import draw_view, parse_views, reapply_view
from clipdense.pretrain.model import build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.synth.writers import atomic_write, tar_bytes
from clipdense.train.task import TrainContext

TEACHER = [8, 8]     # two teachers, as DataCompDR's two ViT-L-14 (768 + 768), scaled down
VIEWS, N_SYN, ROWS = 3, 2, 7
SIZES = [(90, 70), (64, 96), (120, 80), (80, 80), (100, 64), (72, 108), (96, 96)]


def _unit_blocks(rng, n: int) -> np.ndarray:
    """n embeddings, each teacher's block L2-normalised (as each teacher's encoder emits it)."""
    blocks = [rng.normal(size=(n, d)) for d in TEACHER]
    return np.concatenate([b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks], 1)


def _jpeg(w: int, h: int, rng) -> bytes:
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(60, 200, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        d.rectangle((x, y, x + int(rng.integers(8, 30)), y + int(rng.integers(8, 30))),
                    fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _drop_member(path, name: str) -> None:
    """Rewrite a tar without one member (a DataCompDR sample whose npz is absent)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name != name]
    atomic_write(path, tar_bytes(members))


def _fixture(root) -> dict:
    rng = np.random.default_rng(0)
    (root / "dr").mkdir(parents=True)
    samples, dr, teacher = [], [], {}
    for i, (w, h) in enumerate(SIZES):
        jpg = _jpeg(w, h, rng)
        uid = hashlib.md5(f"uid-{i}".encode()).hexdigest()
        samples.append({"jpg": jpg, "caption": f"picture {i}" if i != 2 else "", "size": (w, h), "uid": uid})
        torch.manual_seed(i)
        pil = Image.open(io.BytesIO(jpg)).convert("RGBA").convert("RGB")  # as DataCompDR's generator opens it
        views = [draw_view(pil)[0] for _ in range(VIEWS)]
        img, txt = _unit_blocks(rng, VIEWS), _unit_blocks(rng, 1 + N_SYN)
        dr.append({"key": f"{i:09d}", "uid": uid, "sha256": hashlib.sha256(jpg).hexdigest(), "url": f"u{i}",
                   "syn_text": [f"synthetic {j} of {i}" for j in range(N_SYN)], "param_aug": views,
                   "image_emb": img, "text_emb": txt})
        teacher[uid] = (img.astype(np.float16).astype(np.float64), txt.astype(np.float16).astype(np.float64), views)
    img2dataset_shard(root / "dc", 0, samples)
    datacompdr_shard(root / "dr" / "00000.tar", dr)
    _drop_member(root / "dr" / "00000.tar", f"{dr[5]['key']}.npz")  # sample 5: no teacher embeddings
    del teacher[dr[5]["uid"]]
    return {"images": str(root / "dc" / "00000.tar"), "recaptions": str(root / "dr"), "teacher": teacher}


def _batch(fx: dict, half: int = 4) -> dict:
    """The joined rows as the collate receives them; row `half` decoded at half size (JPEG draft)."""
    rows = read_shard_local(Storage(fx["images"]))
    joined = join_recaptions(pa.Table.from_pylist(rows, schema=SCHEMA), Storage(fx["recaptions"]), "both").to_pylist()
    assert all(r["error_code"] is None for r in joined) and len(joined) == ROWS
    out = {k: [] for k in ("key", "caption", "syn_captions", "pixels", "aug_params", "teacher_emb", "orig_w",
                           "orig_h", "uid")}
    for i, r in enumerate(joined):
        full = decode_rgb(r["image_bytes"])
        im = decode_rgb(r["image_bytes"], draft_size=(full.size[0] // 2, full.size[1] // 2)) if i == half else full
        for k in ("key", "caption", "syn_captions", "aug_params", "teacher_emb"):
            out[k].append(r[k])
        out["pixels"].append(np.asarray(im))
        out["orig_w"].append(full.size[0])
        out["orig_h"].append(full.size[1])
        out["uid"].append(json.loads(r["meta"])["uid"])
    assert out["pixels"][half].shape[:2] == (SIZES[half][1] // 2, SIZES[half][0] // 2)
    return out


def _task(tmp_path, **distill):
    cfg = {"model": {"name": "clip-tiny"}, "captions": {"policy": "both"},
           "loss": {"distill": {"enabled": True, "teacher_dims": TEACHER, **distill}},
           "train": {"out_dir": str(tmp_path / "run"), "seed": 3}}
    cfg = build_config(PretrainConfig, cfg)
    task = ClipPretrainTask(cfg, build_model(cfg.model, cfg.loss, seed=0))
    ctx = TrainContext(out_dir=tmp_path / "run")
    task.setup(ctx)
    torch.manual_seed(0)
    return task, task.build_model(), ctx


def _soft_ce(t_anchor, t_cand, s_anchor, s_cand, s_scale) -> float:
    """mean over anchors of -sum_c p_teacher(c) log p_student(c); teachers' softmaxes averaged (float64)."""
    total = 0.0
    for r in range(len(t_anchor)):
        p = np.zeros(len(t_cand))
        start = 0
        for d in TEACHER:
            z = 100.0 * t_cand[:, start:start + d] @ t_anchor[r, start:start + d]
            p += np.exp(z - z.max()) / np.exp(z - z.max()).sum() / len(TEACHER)
            start += d
        s = s_scale * s_cand @ s_anchor[r]
        logq = s - s.max() - math.log(np.exp(s - s.max()).sum())
        total -= float(p @ logq)
    return total / len(t_anchor)


def test_distill_loss_equals_an_independent_computation_and_trains(tmp_path):
    fx = _fixture(tmp_path)
    task, model, ctx = _task(tmp_path, weights=[0.0, 1.0])
    raw = _batch(fx)
    b = task._collate(0, True)(raw)
    views = b["distill_views"].tolist()
    assert all(0 <= v < VIEWS for v in views)
    # the image is the stored view the teacher embedded (row 4 from the half-size decode: close, not exact)
    mean, std = torch.tensor(task.pp.mean).view(3, 1, 1), torch.tensor(task.pp.std).view(3, 1, 1)
    for i in range(len(raw["uid"])):
        stored = parse_views(raw["aug_params"][i])
        full = np.asarray(decode_rgb(read_shard_local(Storage(fx["images"]))[i]["image_bytes"]))
        exact = (reapply_view(full, SIZES[i], stored[views[i]], task.pp.size) - mean) / std
        err = (b["image"][i] - exact).abs().max().item()
        assert err < 1e-4 if i != 4 else 0.05 < err and (b["image"][i] - exact).abs().mean() < 0.2, (i, err)

    loss, metrics = task.loss(model, b, ctx)
    assert metrics["distill_rows"] == ROWS - 1 and "loss_real" not in metrics  # contrastive weight 0: not computed

    # independent: student features from the model, teacher targets straight from the fixture's arrays
    slots = pick_batch("both", b["keys"], raw["caption"], raw["syn_captions"], 3, 0)
    with torch.no_grad():
        img_f = model.encode_image(b["image"], normalize=True).double().numpy()
        txt_f = [model.encode_text(t, normalize=True).double().numpy() for t in b["texts"]]
        scale = float(model.logit_scale.exp())
    expected = 0.0
    for s, kind in enumerate(("real", "synthetic")):
        keep = [i for i, u in enumerate(raw["uid"])
                if u in fx["teacher"] and (kind == "synthetic" or raw["caption"][i])]
        assert len(keep) == (ROWS - 2 if kind == "real" else ROWS - 1)
        t_img = np.stack([fx["teacher"][raw["uid"][i]][0][views[i]] for i in keep])
        t_txt = np.stack([fx["teacher"][raw["uid"][i]][1][0 if kind == "real" else
                                                          1 + raw["syn_captions"][i].index(slots[1][i])]
                          for i in keep])
        si, st = img_f[keep], txt_f[s][keep]
        expected += (_soft_ce(t_img, t_txt, si, st, scale) + _soft_ce(t_txt, t_img, st, si, scale)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["logit_scale"] is not None and grads["logit_scale"].abs() > 0
    assert grads["visual.conv1.weight"].abs().sum() > 0 and grads["token_embedding.weight"].abs().sum() > 0

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(6):  # a few steps on this batch: the student moves towards the teachers
        opt.zero_grad()
        step_loss, _ = task.loss(model, b, ctx)
        step_loss.backward()
        opt.step()
        task.after_step(model, ctx)
        first = first if first is not None else step_loss.item()
    assert step_loss.item() < first - 1e-3


def test_one_teacher_without_masks_is_open_clips_distill_clip_loss():
    from open_clip.loss import DistillClipLoss

    from clipdense.pretrain.distill import DistillLoss

    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 12, generator=g), dim=1) for _ in range(2))
    t_img, t_txt = (torch.nn.functional.normalize(torch.randn(6, 10, generator=g), dim=1) for _ in range(2))
    img.requires_grad_(True)
    ours = DistillLoss([10], 100.0)(img, txt, torch.tensor(20.0), t_img, t_txt, torch.ones(6, dtype=torch.bool))
    ref = DistillClipLoss()(img, txt, torch.tensor(20.0), t_img, t_txt, torch.tensor(100.0), output_dict=True)
    assert ours.item() == pytest.approx(ref["distill_loss"].item(), rel=1e-6)


def test_a_batch_without_teacher_rows_is_a_zero_with_gradient(tmp_path):
    from clipdense.pretrain.distill import DistillLoss

    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    loss = DistillLoss([4, 4])(img, img.detach().flip(0), torch.tensor(10.0), torch.zeros(4, 8), torch.zeros(4, 8),
                               torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and img.grad is not None and torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="teacher_dims"):
        DistillLoss([768, 768])(img, img, torch.tensor(1.0), torch.zeros(4, 8), torch.zeros(4, 8),
                                torch.ones(4, dtype=torch.bool))


def test_stored_views_need_the_original_size(tmp_path):
    fx = _fixture(tmp_path)
    task, _, _ = _task(tmp_path)
    raw = _batch(fx)
    raw.pop("orig_w")
    with pytest.raises(DataError, match="orig_w / orig_h"):
        task._collate(0, True)(raw)


@pytest.mark.parametrize("override, match", [
    ({"captions": {"policy": "mix"}}, "need captions.policy both"),
    ({"captions": {"policy": "real"}}, "need captions.policy both"),
    ({"loss": {"distill": {"enabled": True, "weights": [0, 0]}}}, "not both 0"),
])
def test_distill_config_errors_are_one_line(override, match):
    cfg = {"loss": {"distill": {"enabled": True}}, **override}
    with pytest.raises(ConfigError, match=match):
        build_config(PretrainConfig, cfg)
    ok = build_config(PretrainConfig, {"captions": {"policy": "synthetic"},
                                       "loss": {"distill": {"enabled": True, "slots": ["synthetic"]}}})
    assert ok.loss.distill.weights == (0.0, 1.0) and ok.loss.distill.logit_scale == 100.0


def test_shards_without_teacher_embeddings_are_refused():
    from clipdense.pretrain.data import check_counts

    cfg = build_config(PretrainConfig, {"captions": {"policy": "both"}, "loss": {"distill": {"enabled": True}}})
    counts = {"ok": 3, "synthetic": {"rows_with_teacher_emb": 0}}
    with pytest.raises(DataError, match="no usable row .* carries DataCompDR teacher embeddings"):
        check_counts(counts, cfg.data.shards, distill=True)
    check_counts(counts, cfg.data.shards, distill=False)
    check_counts({"ok": 3, "synthetic": {"rows_with_teacher_emb": 1}}, cfg.data.shards, distill=True)


def _rank_worker(rank: int, port: int, data: dict, out: dict) -> None:
    import torch.distributed as dist

    from clipdense.pretrain.distill import DistillLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sl = slice(4 * rank, 4 * rank + 4)
        img = data["img"][sl].clone().requires_grad_(True)
        txt = data["txt"][sl].clone().requires_grad_(True)
        loss_fn = DistillLoss([4, 4], 100.0, rank=rank, world_size=2)
        values = []
        for mask in (data["mask"], data["mask_rank0_only"]):
            loss = loss_fn(img, txt, torch.tensor(10.0), data["t_img"][sl], data["t_txt"][sl], mask[sl])
            loss.backward()  # the gathers' backward collectives run on both ranks, also for an all-masked rank
            values.append(loss.item())
        out[rank] = values
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process():
    """gloo, 2 processes: each rank's local loss against every rank's kept candidates; with equal kept rows per
    rank their mean is the one-process loss; a rank with no kept row gives 0 without stalling the other's backward."""
    import socket

    import torch.multiprocessing as mp

    from clipdense.pretrain.distill import DistillLoss

    g = torch.Generator().manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    t_img = torch.cat([unit(8, 4), unit(8, 4)], 1)
    data = {"img": unit(8, 6), "txt": unit(8, 6), "t_img": t_img, "t_txt": torch.cat([unit(8, 4), unit(8, 4)], 1),
            "mask": torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool),
            "mask_rank0_only": torch.tensor([1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)}
    one = DistillLoss([4, 4], 100.0)
    ref = one(data["img"], data["txt"], torch.tensor(10.0), data["t_img"], data["t_txt"], data["mask"]).item()
    ref0 = one(data["img"], data["txt"], torch.tensor(10.0), data["t_img"], data["t_txt"],
               data["mask_rank0_only"]).item()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(port, data, out), nprocs=2, join=True)
        res = dict(out)
    assert (res[0][0] + res[1][0]) / 2 == pytest.approx(ref, rel=1e-5)
    assert res[0][1] == pytest.approx(ref0, rel=1e-5) and res[1][1] == 0.0


def test_teacher_targets_stay_float32_under_autocast():
    from clipdense.pretrain.distill import DistillLoss

    g = torch.Generator().manual_seed(2)
    t_img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    t_txt = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    keep = torch.ones(16, dtype=torch.bool)
    loss = DistillLoss([8], 100.0)
    plain = loss.teacher_probs(t_img, t_txt, keep, keep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss.teacher_probs(t_img, t_txt, keep, keep)
        img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
        value = loss(img, img.flip(0), torch.tensor(10.0), t_img, t_txt, keep)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert torch.isfinite(value)


def test_distillation_pretrains_end_to_end_through_ray(ray_local, tmp_path):
    """The whole path on Ray: DataCompDR join -> whole-image decode with the original size -> the stored views in
    the collate -> the distillation loss, logged per step."""
    from clipdense.pretrain import run as pretrain

    fx = _fixture(tmp_path)
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "captions": {"policy": "both"}, "ray": {"in_process": True},
        "loss": {"distill": {"enabled": True, "teacher_dims": TEACHER}},
        "data": {"shards": fx["images"], "recaptions": fx["recaptions"], "batch_size": ROWS, "decode_cpus": 0.5},
        "train": {"out_dir": str(tmp_path / "pre"), "schedule": {"total_steps": 2, "warmup_steps": 1},
                  "checkpoint": {"every_steps": 0}, "log_every": 1}})
    pretrain(cfg)
    steps = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(s["distill_rows"] == ROWS - 1 for s in steps)  # every row but the one without an npz
