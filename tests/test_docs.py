"""The commands of README.md and docs/*.md run as written, on the synthetic world (an example that drifts from the code
fails here).

Every ```bash block of README.md and docs/*.md runs as one bash script (`set -euo pipefail`), in one working folder
outside the checkout, README first (its quickstart writes `runs/`), then the pages in PAGES order (their blocks read
what the quickstart wrote). A block whose first line is `# from the checkout` runs in the repository root instead
(the job specs live there, not in the package). The one substitution is the one README states: RAY_ADDRESS points
every command at one local Ray this module starts, instead of each command starting its own.

A block fenced ```bash no-test is not run; its first line says why (`# not run in tests: WHY`). The test prints them
and compares them with NOT_RUN: a new command that cannot run here must be added there, where a reviewer sees it.

Running the blocks is opt-in (below). What always runs, in seconds: every `clipdense <stage>` command of every
block, run or not (GPU recipes and real data included), resolves its config with `--print-config`, so a renamed
config, key or argument in the code fails CI until the docs follow.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import pytest

from clipdense.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Run order: README's quickstart first, then pages whose blocks build on earlier ones.
PAGES = ["README.md", "docs/data-and-layouts.md", "docs/recaption.md", "docs/pretraining.md", "docs/dense.md",
         "docs/sweeps-and-report.md", "docs/tracking-and-export.md", "docs/clusters-and-jobs.md", "docs/demo.md",
         "docs/real-data.md", "docs/fault-tolerance.md", "docs/benchmarks.md", "docs/results.md"]
FROM_CHECKOUT = "# from the checkout"
NOT_RUN_PREFIX = "# not run in tests:"

# (page, first command of the block) of every block the docs mark `no-test`, with the reason they give.
NOT_RUN = {
    ("README.md", 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]"'):
        "installs packages (the test suite runs inside this environment)",
    ("README.md", "clipdense demo --quick"):
        "the quick demo takes ~2.5 min (tests/test_demo.py runs a smaller one twice) and the test suite is what runs "
        "this file (on 2 xdist workers, a test module each; `-n 0`: one process)",
    ("docs/data-and-layouts.md", "clipdense pretrain --config vitb16-datacompdr \\"):
        "real data (DataComp-12M images and DataCompDR-12M, ~1.5 TB) on a GPU cluster",
    ("docs/recaption.md", "clipdense recaption --config coca-vitl14-datacompdr input=/data/datacomp-12m "
                          "output=/data/recaption/coca-vitl14"):
        "needs CUDA GPUs and the coca_ViT-L-14 weights (downloaded from the HF hub)",
    ("docs/recaption.md", "clipdense recaption --config qwen2.5vl-7b-vllm input=/data/datacomp-12m "
                          "output=/data/recaption/qwen2.5vl-7b"):
        "needs CUDA GPUs, vLLM and the Qwen2.5-VL-7B weights (~16 GB from the HF hub)",
    ("docs/recaption.md", "PY=$(clipdense vllm-env ~/.cache/clipdense/vllm-env) && $PY -m "
                          "clipdense.recaption.tiny_vlm runs/tiny-vlm && \\"):
        "builds a separate vLLM venv (minutes, Linux x86_64); tests/test_recaption_vllm_real.py runs it",
    ("docs/pretraining.md", "clipdense eval model.name=ViT-B-16 "
                            "model.pretrained=runs/pretrain/vitb16-datacompdr/export/model.pt \\"):
        "needs an ImageFolder of real classes (e.g. ImageNet's validation set, one folder per class)",
    ("docs/dense.md", "clipdense finetune --config ade20k-upernet-vitb16 data.root=/data/ade \\"):
        "real datasets on 8 GPUs (160k iterations; see real-data.md for the cost)",
    ("docs/sweeps-and-report.md", "clipdense sweep --config data-efficiency"):
        "261 finetunes (~1 CPU-hour) and 8 trials of 200 steps",
    ("docs/tracking-and-export.md", "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db"):
        "a server that keeps running (open http://127.0.0.1:5000)",
    ("docs/clusters-and-jobs.md", "clipdense cluster up --local"):
        "starts and stops a multi-process cluster (tests/test_cluster_local.py covers it)",
    ("docs/demo.md", "clipdense demo --quick --out runs/demo-quick"):
        "the quick demo takes ~2.5 min on 2 cores (tests/test_demo.py runs a smaller one twice), the default one "
        "~50 min",
    ("docs/real-data.md", "ray get-auth-token --generate"):
        "a real cloud cluster (cluster/README.md has the whole setup)",
    ("docs/real-data.md", "img2dataset --url_list /data/datacomp-12m-meta --input_format parquet --url_col url "
                          "--caption_col text \\"):
        "downloads 12.8M images (~1.5 TB of shards at full size); a template we have not run at scale",
    ("docs/real-data.md", "clipdense submit jobs/recaption-vllm-datacomp.yaml input=s3://BUCKET/datacomp-12m \\"):
        "GPU nodes with vLLM (the clipdense[vllm] image) and the Qwen2.5-VL-7B weights",
    ("docs/real-data.md", "clipdense submit jobs/pretrain-vitb16-datacompdr.yaml "
                          "data.shards=s3://BUCKET/datacomp-12m/{00000000..00001199}.tar \\"):
        "64 GPUs for ~41 H100 GPU-hours each",
    ("docs/real-data.md", "clipdense submit jobs/finetune-ade20k.yaml --address http://127.0.0.1:8265 --follow"):
        "8 GPUs, 160k iterations (~13 H100 GPU-hours, an estimate)",
    ("docs/real-data.md", "clipdense submit sweep --config configs/sweep/data-efficiency-real.yaml "
                          "--address http://127.0.0.1:8265 --follow"):
        "60 finetunes of 8 GPUs (~45 H100 GPU-hours, an estimate)",
    ("docs/benchmarks.md", "python -m bench.run"):
        "benchmarks take minutes each and need a quiet machine (the suite would measure its own load)",
}

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: str
    index: int          # position among the page's bash blocks
    body: str
    run: bool

    @property
    def lines(self) -> list[str]:
        return [line for line in self.body.splitlines() if line.strip()]

    @property
    def first_command(self) -> str:
        """The first command line, without a trailing `  # comment`."""
        line = next(line for line in self.lines if not line.lstrip().startswith("#"))
        return re.sub(r"\s+#\s.*$", "", line)

    @property
    def reason(self) -> str:
        """The block's leading comment lines, joined, after `# not run in tests:` ("" without that prefix)."""
        head = " ".join(line.lstrip("#").strip() for line in takewhile(lambda s: s.startswith("#"), self.lines))
        prefix = NOT_RUN_PREFIX.lstrip("# ")
        return head.removeprefix(prefix).strip() if head.startswith(prefix) else ""

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"


def bash_blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        words = m["info"].split()
        if words[:1] != ["bash"]:
            continue
        blocks.append(Block(page, len(blocks), m["body"], run="no-test" not in words[1:]))
    return blocks


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in bash_blocks(page)]


# ---- the pages themselves (cheap) ----

def test_every_page_is_in_the_run_order_and_linked_from_readme():
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    assert len(pages) >= 4 and sorted(PAGES[1:]) == pages
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert all(f"({p})" in readme for p in pages), [p for p in pages if f"({p})" not in readme]
    for marker in ('pip install -e ".[test]"', "python -m pytest -q"):   # .ci/run installs and tests this way
        assert marker in readme


def test_relative_links_point_at_files():
    link = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")
    broken = [(page, target) for page in PAGES for target in link.findall((ROOT / page).read_text())
              if not ((ROOT / page).parent / target).exists()]
    assert not broken


def test_unrun_commands_are_the_reviewed_ones():
    skipped = {(b.page, b.first_command): b.reason for b in all_blocks() if not b.run}
    print("\nDocs commands not run here:")
    for (page, command), reason in skipped.items():
        print(f"  {page}: {command}\n      {reason}")
    assert all(skipped.values()), [k for k, v in skipped.items() if not v]   # each says why
    assert skipped == NOT_RUN


SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def stage_commands(block: Block) -> list[list[str]]:
    """The block's `clipdense <stage> ...` commands, each as the argv after `clipdense`: variables the block assigns
    (README's $SHORT) expanded, `\\` continuations joined, a quote may close on a later line, comments dropped."""
    found, assigned, pending = [], {}, ""
    for line in block.body.replace("\\\n", " ").splitlines():
        pending += line + "\n"
        lex = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:       # a quote that closes on a later line
            continue
        pending = ""
        if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=.*", tokens[0], re.DOTALL):
            name, value = tokens[0].split("=", 1)
            assigned[name] = value.split()
            continue
        words: list[str] = []
        for token in [*tokens, ";"]:
            if token in SEPARATORS:
                if len(words) > 1 and words[0] == "clipdense" and words[1] in STAGES:
                    found.append(words[1:])
                words = []
            else:
                var = re.fullmatch(r"\$\{?(\w+)\}?", token)
                words += assigned[var[1]] if var and var[1] in assigned else [token]
    return found


# Resolves each argv (JSON) with `--print-config` in one process; prints [exit code, stderr tail] per command.
RESOLVE = """
import contextlib, io, json, sys
from clipdense.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--print-config"])
        except SystemExit as e:   # argparse's own usage errors
            code = e.code
    results.append([code, err.getvalue().strip()[-600:]])
print(json.dumps(results))
"""


def test_every_stage_command_in_the_docs_resolves_its_config(tmp_path):
    """Run or not here, each stage command of README and docs/ still names a shipped config, keys, values and
    arguments the code accepts (in an empty folder: `--print-config` needs none of the inputs to exist)."""
    commands = [(b.id, argv) for b in all_blocks() for argv in stage_commands(b)]
    starts = re.compile(rf"^\s*clipdense ({'|'.join(STAGES)})\b")
    assert len(commands) == sum(bool(starts.match(ln)) for b in all_blocks() for ln in b.lines) > 20
    p = subprocess.run([sys.executable, "-c", RESOLVE, json.dumps([argv for _, argv in commands])], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.splitlines()[-1])
    failed = [f"{block}: clipdense {' '.join(argv)}\n    {err}"
              for (block, argv), (code, err) in zip(commands, results, strict=True) if code != 0]
    assert not failed, "\n".join(failed)


# ---- running them ----

RAY_HEAD = """
import sys
import ray
ray.init(num_cpus=4, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()   # until the test closes stdin; ray.init's exit hook then stops what it started
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(scope="module")
def ray_address(workdir):
    """One local Ray for every command (README: set RAY_ADDRESS to run them on one cluster). Started with the
    working folder as its cwd, as a Ray a command starts would be; token auth off, as for a Ray only this test uses."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], cwd=workdir, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    address = head.stdout.readline().strip()
    start = time.time()
    try:
        assert re.fullmatch(r"[\w.-]+:\d+", address), f"the Ray head printed {address!r}"
        yield address
    finally:
        head.stdin.close()
        try:
            head.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)   # our own process group only (start_new_session)
            head.wait(30)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"\ndocs commands: {time.time() - start:.0f} s wall, {used.ru_utime + used.ru_stime:.0f} s CPU "
              "(this process's waited children: the blocks and the Ray head)")


def _env(address: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)   # `clipdense` and `python` of this environment
    return {**os.environ, "RAY_ADDRESS": address, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
# Opt-in for now: run after other test modules (a full suite) the quickstart's first Ray Data read in `clipdense
# pretrain` waited forever for its tasks on the docs' Ray (twice, 2026-12-07); alone the module passed 4 of 4 runs.
# A hang would cost CI its 1,800 s and turn it red, so CI skips it until the cause is found (#34, #36).
@pytest.mark.skipif(os.environ.get("CLIPDENSE_DOCS_TEST") != "1",
                    reason="opt-in: CLIPDENSE_DOCS_TEST=1 python -m pytest tests/test_docs.py")
@pytest.mark.timeout(1800)   # README's quickstart: 5-8 min on 2 lightly loaded cores, far more on a busy machine
@pytest.mark.parametrize("block", [b for b in all_blocks() if b.run], ids=lambda b: b.id)
def test_docs_block_runs_as_written(block, workdir, ray_address):
    cwd = ROOT if block.lines[0].strip() == FROM_CHECKOUT else workdir
    log = workdir / f"{block.id.replace('/', '_')}.log"
    t0 = time.time()
    with open(log, "w") as out:
        # each command is echoed to the log with the block's elapsed seconds before it (bash's SECONDS)
        script = "set -euo pipefail\nPS4='+ [${SECONDS}s] '\nset -x\n" + block.body
        proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=_env(ray_address), stdout=out,
                              stderr=subprocess.STDOUT)
    print(f"{block.id}: {time.time() - t0:.0f} s")
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{block.body}\n--- log tail ---\n" + \
        log.read_text(errors="replace")[-6000:]
