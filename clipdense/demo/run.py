"""`clipdense demo [--quick] [--out DIR]`: the paper's claim end to end on the synthetic world, on local Ray.

1. generate the world            (synth)
2. train a CoCa captioner         (pretrain, CoCa loss, on the curated subset's accurate descriptions)
3. recaption the web corpus       (recaption, the captioner in a Ray Data actor pool); the oracle's captions
4. pretrain the CLIPs, one budget (pretrain: alt texts vs recaptions vs true descriptions, `runs` each)
5. probe seg + depth              (sweep: fractions x conditions x seeds, on frozen features)
6. report                         (plots, tables, efficiency factor, a one-screen summary)

Conditions: `alt-text-clip` (the reference), `recap-clip` (the claim), `oracle-clip` (pretrained on the world's true
descriptions: a positive control, an upper reference, never the claim) and `random-init` (the floor), plus a
position-only baseline under the fitted probe. The true descriptions otherwise train only the captioner (curated
subset) and score caption quality. Each step writes a marker holding its config's hash: a rerun skips the steps
whose config is unchanged and reruns from the first changed one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from clipdense.config import run_provenance
from clipdense.demo.config import DemoConfig
from clipdense.demo.stages import (
    PRETRAINED,
    captioner_config,
    clip_config,
    recaption_config,
    run_name,
    sweep_config,
)
from clipdense.demo.steps import Step, Steps
from clipdense.pretrain.run import run as run_pretrain
from clipdense.ray_session import cluster_cpus, ray_session
from clipdense.recaption import run as run_recaption
from clipdense.sweep.report import ReportConfig
from clipdense.sweep.report import run as write_report
from clipdense.sweep.run import run as run_sweep
from clipdense.synth.config import SynthConfig
from clipdense.synth.oracle import write_oracle_captions
from clipdense.synth.run import run as run_synth
from clipdense.synth.scoring import score_caption_sources

STEPS = 6


def run(cfg: DemoConfig) -> dict:
    with ray_session(cfg.ray):
        # the one training worker gets every core but one Ray CPU for the decode tasks feeding it (torch threads)
        threads = max(1, min(os.cpu_count() or 1, cluster_cpus() - 1))
        return Demo(cfg, threads).run()


class Demo:
    """The six steps over one output folder (`cfg.out`)."""

    def __init__(self, cfg: DemoConfig, threads: int):
        self.cfg, self.threads, self.p = cfg, threads, cfg.scale.model_copy(update={"runs": cfg.runs})
        self.out = Path(cfg.out)
        self.world, self.captioner = self.out / "world", self.out / "captioner"
        self.recap, self.oracle, self.sweep_dir = self.out / "recaptioned", self.out / "oracle", self.out / "sweep"
        self.steps = Steps(self.out, cfg.fresh, STEPS)

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        self.make_world()
        self.train_captioner()
        quality = self.recaption()
        self.probe(self.pretrain_clips())
        report = self.report()
        summary = {"out": str(self.out), "preset": "quick" if self.cfg.quick else "default",
                   "conditions": self.conditions(), "probe": self.p.probe, "caption_quality": quality,
                   "report": report, "steps": self.steps.records, "seconds": round(time.time() - t_start, 1),
                   "provenance": run_provenance(self.cfg.model_dump(mode="json"))}
        (self.out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"\ndemo finished in {summary['seconds']:.0f}s; report: {self.sweep_dir / 'report.md'}")
        return {"out": str(self.out), "seconds": summary["seconds"], "caption_quality": quality}

    def conditions(self) -> dict[str, dict]:
        return {**{c: {"runs": self.p.runs, "role": "reference" if c == "alt-text-clip" else
                       "positive control (upper reference)" if c == "oracle-clip" else "candidate"}
                   for c in PRETRAINED},
                "random-init": {"runs": self.p.random_init_seeds, "role": "floor"}}

    def make_world(self) -> None:
        world = SynthConfig(out=str(self.world), seed=self.cfg.seed, **self.p.synth.model_dump(exclude_unset=True))
        with self._step(1, "world", "generate the synthetic world", world, self.world) as s:
            if not s.done:
                run_synth(world)

    def train_captioner(self) -> None:
        coca = captioner_config(self.p, self.world / "curated", self.captioner, self.cfg.seed, self.threads)
        title = f"train the {self.p.coca_model} captioner on the curated subset (CoCa loss)"
        with self._step(2, "captioner", title, coca, self.captioner) as s:
            if not s.done:
                run_pretrain(coca)

    def recaption(self) -> dict:
        """Step 3, and the oracle's captions; returns the caption quality of every source (scored on every run)."""
        rc = recaption_config(self.p, self.world / "web", self.recap, self.captioner / "export" / "model.pt",
                              self.cfg.seed)
        n = self.p.recaption.num_captions
        with self._step(3, "recaption", "recaption the web corpus through the captioner actor pool",
                        {"recaption": rc, "oracle_captions": n}, self.recap, self.oracle) as s:
            if not s.done:
                run_recaption(rc)
                write_oracle_captions(self.world / "web", self.oracle, n, self.cfg.seed)
        q = score_caption_sources(self.world / "web", {"synthetic": self.recap, "oracle": self.oracle})
        print(f"  caption accuracy (objects named with the right colour and shape): alt text "
              f"{q['alt_text_accuracy']:.2f}, synthetic {q['synthetic_accuracy']:.2f}, oracle "
              f"{q['oracle_accuracy']:.2f}; on atypically coloured objects: {q['alt_text_atypical_accuracy']:.2f}, "
              f"{q['synthetic_atypical_accuracy']:.2f}, {q['oracle_atypical_accuracy']:.2f}")
        return q

    def pretrain_clips(self) -> dict[tuple[str, int], str]:
        """Step 4; returns (condition, replicate) -> exported checkpoint of every pretraining run. A run whose own
        marker holds its config's hash is kept, so a larger `runs` adds runs."""
        runs = {}
        for r in range(self.p.runs):
            for condition, (_, source) in PRETRAINED.items():
                name = run_name(condition, r)
                runs[condition, r] = clip_config(self.p, condition, self.world / "web", self.out / source,
                                                 self.out / "pretrain" / name, self.cfg.seed + r, self.threads)
        hashes = {k: self.steps.digest(v) for k, v in runs.items()}   # each run's own, after step 3's
        title = f"pretrain {self.p.clip_model} CLIPs, identical budgets, {self.p.runs} per condition"
        with self._step(4, "pretrain", title, {f"{c}/{r}": h for (c, r), h in hashes.items()}) as s:
            for (condition, r), pcfg in runs.items():
                run_dir = Path(pcfg.train.out_dir)
                if not s.done and (self.cfg.fresh or not _finished(run_dir, hashes[condition, r])):
                    print(f"  {run_name(condition, r)}: caption policy {pcfg.captions.policy}, seed {pcfg.train.seed}",
                          flush=True)
                    shutil.rmtree(run_dir, ignore_errors=True)    # another config's checkpoints must not resume
                    run_pretrain(pcfg)
                    (run_dir / ".demo-hash").write_text(hashes[condition, r])
        return {k: str(Path(v.train.out_dir) / "export" / "model.pt") for k, v in runs.items()}

    def probe(self, checkpoints: dict[tuple[str, int], str]) -> None:
        scfg = sweep_config(self.p, self.sweep_dir, self.world, checkpoints, self.cfg.seed)
        title = f"probe seg + depth ({self.p.probe}, frozen trunk): fractions x {len(scfg.backbones)} backbones x seeds"
        with self._step(5, "probe", title, scfg, self.sweep_dir) as s:
            if not s.done:
                run_sweep(scfg.model_copy(update={"run_report": False}))

    def report(self) -> dict:
        with self._step(6, "report", "report: plots, tables, efficiency factor", {"always": time.time()}):
            return write_report(ReportConfig(results_dir=str(self.sweep_dir), reference="alt-text-clip"))

    def _step(self, n: int, name: str, title: str, config, *outputs: Path) -> Step:
        return self.steps.step(n, name, title, config, outputs)


def _finished(run_dir: Path, digest: str) -> bool:
    marker = run_dir / ".demo-hash"
    return marker.is_file() and marker.read_text() == digest and (run_dir / "export" / "model.pt").is_file()

