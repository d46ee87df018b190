"""Best-of-N reranking of the demo captioner's captions (issue 35, item 6): does sampling N candidates per image and
keeping the k best by a CLIP score raise the captions' accuracy on atypically coloured objects, and at what
recaption cost?

    python -m bench.rerank_demo --demo DIR [--candidates 1,4,8] [--max-shards 0] [--scorer alt-text-clip]
                                [--preset quick|default] [--work /tmp/rerank_demo] [--wait 300] [--quick]
                                [scale.KEY=VALUE | seed=N ...]

`--demo`: a finished `clipdense demo --out DIR` folder (steps 1-4 are enough). The bench reuses its world's web
shards (which carry the true descriptions, for scoring only), its trained captioner (step 2) and, as the scorer,
its `alt-text-clip` run 0 (step 4). The demo's config is rebuilt from `--preset` (default: the one
`demo_summary.json` names, else quick) and the same `scale.KEY=VALUE` / `seed=N` overrides the demo was run with;
the recaption config then comes from the demo's own `recaption_config` (configs/demo/stages/recaption.yaml with the
preset's scale), and the bench refuses to run when its sampling settings differ from those the demo's step 3
recorded in its Parquet outputs (wrong preset or overrides).

Each N of `--candidates` runs `clipdense.recaption.run` over the same web shards (the first `--max-shards`; 0 = all)
into a fresh folder, inside one local Ray with the demo's resources (Ray starts before the first run and is not
timed), adding a `teachers:` section whose only model is the scorer (`teachers.scorer`, 1 view, no stats):
- N > 1: `engine.rerank: {candidates: N, keep: k}` with k = the demo's `recaption.num_captions` (what step 3
  keeps): the captioner samples N candidates, duplicates are dropped, the k best by the scorer's CLIP score remain;
- N = 1: no rerank: the captioner samples the demo's k captions as step 3 does (its captions are compared with
  step 3's, which they should equal), and the same teacher section still scores them, so both sides pay the same
  teacher forward and the cost difference is what sampling and scoring N candidates adds. Any 1 < N < k is
  refused (keep cannot exceed candidates).
The captions of every N are then scored together with `score_caption_sources`, as the demo scores step 3, on the
same images: accuracy (objects named with the right colour and shape), colour / shape recall, atypical accuracy and
atypical prior error, with the web alt texts and the true descriptions of those images as references.

The scorer must never be `oracle-clip` or anything else trained on the world's true descriptions: reranking by it
would leak the descriptions into the captions. The scorer is a demo condition name or an exported checkpoint of a
`clipdense pretrain` run whose `config.yaml` (beside `export/`) shows what it was trained on; the bench refuses
oracle-clip runs, anything trained on the demo's `oracle/` captions, on the world's curated subset (whose captions
are the true descriptions: this excludes the captioner itself, though issue 35 counts its contrastive head as
fair) or on shards other than the demo's web shards, and any checkpoint without such a config.

Rows: per N > 1, atypical accuracy, atypical prior error, overall accuracy, recaption seconds and images/s of
best-of-N vs N = 1 (the stage's pipeline seconds: actor start, decode, captioning, teacher forward, writing), plus
the references. Figures taken while the 1-minute load average was above the limit are marked loaded. Not part of
`bench.run` (needs a finished demo).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import RoundLoads, load_note, row, write_report
from clipdense.config import build_config, load_config, read_yaml
from clipdense.data.storage import Storage
from clipdense.demo.config import PRESETS, DemoConfig
from clipdense.demo.run import Demo
from clipdense.demo.stages import PRETRAINED, recaption_config, run_name
from clipdense.ray_session import ray_session
from clipdense.recaption import run as run_recaption
from clipdense.recaption.config import RecaptionConfig
from clipdense.recaption.engines.resolve import provenance
from clipdense.recaption.scores import quantiles, read_scores
from clipdense.synth.scoring import read_caption_folder, score_caption_sources

BENCH = "rerank_demo"
REFERENCE = "alt-text-clip"     # the demo condition scoring by default: pretrained on the web's alt texts only
LEAKY = "oracle-clip"           # pretrained on the world's true descriptions: never a scorer


def demo_config(demo: Path, preset: str | None, overrides: list[str]) -> DemoConfig:
    """The demo's config as it ran in `demo`: its preset (given, else demo_summary.json's, else quick) and the
    overrides it was run with."""
    if preset is None:
        summary = demo / "demo_summary.json"
        preset = json.loads(summary.read_text()).get("preset", "quick") if summary.is_file() else "quick"
    if preset not in PRESETS:
        raise SystemExit(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
    if any(o.split("=", 1)[0] in ("out", "quick") for o in overrides):
        raise SystemExit("give the demo folder as --demo and the preset as --preset, not as overrides")
    return load_config(DemoConfig, None, [f"quick={preset == 'quick'}", f"out={demo}", *overrides])


def _trained_on(run_dir: Path) -> tuple[Path | None, Path | None, str]:
    """(shards, recaptions, caption policy) of a `clipdense pretrain` run, from its config.yaml."""
    cfg = read_yaml(run_dir / "config.yaml")
    data, policy = cfg.get("data") or {}, (cfg.get("captions") or {}).get("policy", "real")
    path = lambda v: Path(v).resolve() if isinstance(v, str) and v else None  # noqa: E731
    return path(data.get("shards")), path(data.get("recaptions")), policy


def scorer_checkpoint(d: Demo, scorer: str) -> tuple[str, Path]:
    """(open_clip model name, exported checkpoint) of the scorer: a demo condition (run 0) or a checkpoint path.
    Refuses whatever may have been trained on the true descriptions (see the module docstring)."""
    if scorer.startswith(LEAKY):
        raise SystemExit(f"--scorer {scorer}: oracle-clip is pretrained on the world's true descriptions; "
                         "reranking by it would leak them into the captions (use alt-text-clip)")
    ckpt = (d.out / "pretrain" / run_name(scorer, 0) / "export" / "model.pt" if scorer in PRETRAINED
            else Path(scorer)).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"scorer checkpoint {ckpt} not found (did the demo's step 4 run?)")
    run_dir = ckpt.parent.parent
    if any(p.name.startswith(LEAKY) for p in ckpt.parents):     # oracle-clip, oracle-clip-r1, ...
        raise SystemExit(f"--scorer {ckpt}: an oracle-clip run, pretrained on the true descriptions; refused")
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"--scorer {ckpt}: no {run_dir / 'config.yaml'} says what it was trained on; only a "
                         "checkpoint shown to be trained on the web shards without the true descriptions may score")
    shards, recaptions, policy = _trained_on(run_dir)
    web, oracle, curated = (p.resolve() for p in (d.world / "web", d.oracle, d.world / "curated"))
    if shards != web:
        raise SystemExit(f"--scorer {ckpt}: trained on {shards}, not the demo's web shards {web}"
                         + (" (the curated subset's captions are the true descriptions)" if shards == curated
                            else "") + "; refused")
    if policy != "real" and recaptions == oracle:
        raise SystemExit(f"--scorer {ckpt}: trained on the oracle's captions (the true descriptions); refused")
    export = json.loads((ckpt.parent / "export.json").read_text()) if (ckpt.parent / "export.json").is_file() else {}
    name = export.get("name") or (read_yaml(run_dir / "config.yaml").get("model") or {}).get("name")
    if not name:
        raise SystemExit(f"--scorer {ckpt}: its open_clip model name is in neither export.json nor config.yaml")
    return name, ckpt


def check_matches_step3(rc: RecaptionConfig, recap: Path, k: int) -> None:
    """The rebuilt step-3 config samples as the demo's step 3 did (its Parquet outputs' `sampling` column)."""
    import pyarrow.parquet as pq

    files = sorted(recap.glob("*.parquet"))
    if not files:
        raise SystemExit(f"{recap}: no recaptions (did the demo's step 3 run?)")
    t = pq.read_table(files[0], columns=["engine", "sampling", "syn_captions"]).slice(0, 1).to_pylist()
    if not t:
        raise SystemExit(f"{files[0]}: empty")
    ours = provenance(rc.engine)
    if (t[0]["engine"], json.loads(t[0]["sampling"])) != (ours["engine"], json.loads(ours["sampling"])):
        raise SystemExit(f"the demo's step 3 sampled with {t[0]['sampling']}, the rebuilt config with "
                         f"{ours['sampling']}: pass the demo's --preset and scale.KEY=VALUE overrides")
    if t[0]["syn_captions"] is not None and len(t[0]["syn_captions"]) != k:
        raise SystemExit(f"the demo's step 3 kept {len(t[0]['syn_captions'])} captions per image, the preset {k}")


def rerank_config(rc: RecaptionConfig, inputs: list[str], out: Path, n: int, k: int, scorer: tuple[str, Path],
                  ray: dict) -> RecaptionConfig:
    """Step 3's config on `inputs` into `out`, plus the scorer as the only teacher and, for n > 1, best-of-n."""
    data = rc.model_dump(mode="json")
    name, ckpt = scorer
    data.update(input=inputs, output=str(out), ray=ray, stats={"enabled": False},
                teachers={"models": [{"name": name, "pretrained": str(ckpt)}], "scorer": name, "views": 1,
                          "device": "cpu", "concurrency": 1, "num_cpus": 1.0})
    data["engine"]["rerank"] = {"candidates": n, "keep": k} if n > 1 else None
    return build_config(RecaptionConfig, data, f"bench rerank_demo (N={n})")


def same_captions(a: Path, b: Path) -> float | None:
    """Fraction of the images both folders caption whose captions are identical (N=1 vs the demo's step 3)."""
    ta, tb = read_caption_folder(a), read_caption_folder(b)
    keys = ta.keys() & tb.keys()
    return sum(ta[x] == tb[x] for x in keys) / len(keys) if keys else None


def parse_args(argv: list[str] | None, quick: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.rerank_demo")
    ap.add_argument("--demo", required=True, help="a finished `clipdense demo --out` folder (steps 1-4)")
    ap.add_argument("--preset", choices=PRESETS, default=None, help="the demo's preset (default: from its summary)")
    ap.add_argument("--candidates", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--max-shards", type=int, default=0, help="the first M web shards (0: all)")
    ap.add_argument("--scorer", default=REFERENCE, help="a demo condition (run 0) or an exported checkpoint")
    ap.add_argument("--work", default="/tmp/rerank_demo", help="where each N's recaptions are written")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a quiet machine before a run")
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 1, 4 on one shard")
    ap.add_argument("overrides", nargs="*", help="the demo's own overrides (scale.KEY=VALUE, seed=N)")
    a = ap.parse_args(argv or [])
    if quick or a.quick:
        a.quick, a.candidates, a.max_shards = True, [1, 4], 1
    return a


def main(argv: list[str] | None = None, quick: bool = False) -> list[dict]:
    a = parse_args(argv, quick)
    cfg = demo_config(Path(a.demo), a.preset, a.overrides)
    d = Demo(cfg, threads=1)        # the demo's own folders (world, captioner, recaptioned, oracle) and scale
    k = d.p.recaption.num_captions
    if 1 not in a.candidates:
        raise SystemExit("--candidates must include 1, the peer of every best-of-N figure")
    bad = [n for n in a.candidates if n != 1 and n < k]
    if bad:
        raise SystemExit(f"--candidates {bad}: best-of-N keeps the demo's {k} captions, so N must be 1 or >= {k}")
    web, captioner = d.world / "web", d.captioner / "export" / "model.pt"   # as Demo.recaption passes them
    rc = recaption_config(d.p, web, d.recap, captioner, cfg.seed)
    check_matches_step3(rc, d.recap, k)
    scorer = scorer_checkpoint(d, a.scorer)
    shards = sorted(str(p) for p in web.glob("*.tar"))
    shards = shards[:a.max_shards] if a.max_shards > 0 else shards
    work = Path(a.work)
    loads = RoundLoads(timeout_s=a.wait, quick=a.quick)
    runs: dict[int, dict] = {}
    with ray_session(cfg.ray):      # the demo's local Ray; each run joins it, so its start is not timed
        for n in sorted(set(a.candidates)):
            out = work / f"N{n}"
            shutil.rmtree(out, ignore_errors=True)      # recaption resumes finished shards: start empty
            rcfg = rerank_config(rc, shards, out, n, k, scorer, cfg.ray.model_dump(mode="json"))
            loads.start_round()
            print(f"rerank_demo N={n}: {len(shards)} shards, keep {k}; {load_note()}", flush=True)
            t0 = time.perf_counter()
            s = run_recaption(rcfg)
            runs[n] = {"wall_s": round(time.perf_counter() - t0, 2), "seconds": s["seconds"],
                       "images": s["rows_in"], "captioned": s["rows_captioned"], "failed": s["rows_failed"],
                       "images_per_s": s["images_per_s"], "out": str(out),
                       "scores": quantiles(read_scores([Storage(str(f)) for f in sorted(out.glob("*.parquet"))])
                                           ["synthetic"])}
            print(f"rerank_demo N={n}: {json.dumps(runs[n])}", flush=True)
    q = score_caption_sources(web, {"demo_step3": d.recap, **{f"n{n}": Path(r["out"]) for n, r in runs.items()}})
    same = same_captions(Path(runs[1]["out"]), d.recap)
    detail = {"demo": str(d.out), "preset": "quick" if cfg.quick else "default", "overrides": a.overrides,
              "keep": k, "shards": len(shards), "scorer": f"{scorer[0]}:{scorer[1]}", "runs": runs,
              "quality": q, "n1_equals_step3": same}
    (work / "rerank_demo_detail.json").write_text(json.dumps(detail, indent=2))
    print(json.dumps(detail, indent=2))
    rows = figure_rows(detail, loads)
    kwargs = {"out_dir": Path(a.out)} if a.out else {}
    print(write_report(BENCH, "Best-of-N reranking of the demo captioner", __doc__, rows, **kwargs))
    return rows


def figure_rows(detail: dict, loads: RoundLoads) -> list[dict]:
    runs, q, k = detail["runs"], detail["quality"], detail["keep"]
    base = runs[1]
    given = f" ({' '.join(detail['overrides'])})" if detail.get("overrides") else ""
    where = (f"{base['images']} web images ({detail['shards']} shards) of the {detail['preset']} demo "
             f"{detail['demo']}{given}, keep {k}, scorer {detail['scorer']}; {q['images_scored']} images scored, "
             f"{q['atypical_objects']} atypical objects ({q['atypical_prior_eligible']} prior-eligible)")
    peer1 = f"N=1 (the demo's {k} samples, unranked, same teacher forward)"
    rows = []
    for n in sorted(r for r in runs if r != 1):
        r = runs[n]
        score = f"kept captions' mean CLIP score {r['scores'].get('mean')} vs {base['scores'].get('mean')} at N=1"
        for metric, key, higher, unit in (("atypical accuracy", "atypical_accuracy", True, "fraction"),
                                          ("atypical prior error", "atypical_prior_error", False, "fraction"),
                                          ("accuracy (all objects)", "accuracy", True, "fraction"),
                                          ("colour recall", "colour_recall", True, "fraction"),
                                          ("shape recall", "shape_recall", True, "fraction")):
            rows.append(row(BENCH, f"recaption {metric}, best-of-{n} vs N=1", q[f"n{n}_{key}"], q[f"n1_{key}"],
                            peer1, unit, higher_is_better=higher, rounds=loads, notes=f"{where}; {score}"))
        cost = (f"wall incl. engine resolve: {r['wall_s']} s vs {base['wall_s']} s; {r['failed']} / "
                f"{base['failed']} failed rows; one local Ray with the demo's resources; {load_note()}")
        rows.append(row(BENCH, f"recaption seconds, best-of-{n} vs N=1", r["seconds"], base["seconds"], peer1, "s",
                        higher_is_better=False, rounds=loads, notes=f"{where}; {cost}"))
        rows.append(row(BENCH, f"recaption images/s, best-of-{n} vs N=1", r["images_per_s"], base["images_per_s"],
                        peer1, "images/s", rounds=loads, notes=cost))
    same = detail["n1_equals_step3"]
    for metric, key in (("atypical accuracy", "atypical_accuracy"), ("atypical prior error", "atypical_prior_error"),
                        ("accuracy (all objects)", "accuracy")):
        rows.append(row(BENCH, f"reference {metric}: web alt texts vs true descriptions", q[f"alt_text_{key}"],
                        q[f"true_{key}"], "true descriptions (same images)", "fraction", rounds=loads,
                        higher_is_better=key != "atypical_prior_error",
                        notes=f"{where}; the demo's step 3 on these images: {q[f'demo_step3_{key}']:.4f}; N=1 "
                              f"captions identical to step 3's on {'?' if same is None else f'{same:.0%}'} of "
                              "images"))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
