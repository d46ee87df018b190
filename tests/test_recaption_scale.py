"""The recaption stage over a thousand tiny shards on a real local Ray: blocks span shards, one output per shard,
and a driver SIGKILLed at a random point then rerun leaves every key exactly once."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_files import jpeg_bytes, write_tar

from clipdense.config import build_config
from clipdense.data.shards import rebatch
from clipdense.recaption import RecaptionConfig, run
from clipdense.recaption.writer import shard_runs

SHARDS, PER_SHARD = 1024, 3


def test_rebatch_spans_table_boundaries_in_order():
    tables = [pa.table({"k": list(range(a, b))}) for a, b in ((0, 3), (3, 3), (3, 10), (10, 11), (11, 25))]
    out = list(rebatch(iter(tables), 4))
    assert [t.num_rows for t in out] == [4, 4, 4, 4, 4, 4, 1]
    assert [k for t in out for k in t.column("k").to_pylist()] == list(range(25))


def test_shard_runs_split_a_block_at_each_shard_change():
    block = pa.table({"shard": ["a.tar", "a.tar", "b.tar", "c.tar", "c.tar"], "key": list("12345")})
    runs = shard_runs(block)
    assert [(s, t.column("key").to_pylist()) for s, t in runs] == [("a.tar", ["1", "2"]), ("b.tar", ["3"]),
                                                                   ("c.tar", ["4", "5"])]
    assert shard_runs(block.slice(3)) == [("c.tar", block.slice(3))]


def _tiny_shards(d) -> dict[str, list[str]]:
    """SHARDS tars of PER_SHARD 16-px JPEGs each; {output file name: keys in order}."""
    d.mkdir(parents=True)
    images = [jpeg_bytes(i, size=16) for i in range(8)]
    expected = {}
    for s in range(SHARDS):
        keys = [f"{s:05d}_{i}" for i in range(PER_SHARD)]
        write_tar(d / f"{s:05d}.tar", [{"key": k, "jpg": images[(s + i) % 8], "txt": f"caption {k}"}
                                       for i, k in enumerate(keys)])
        expected[f"{s:05d}.parquet"] = keys
    return expected


def _done(out) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".parquet") and not f.startswith(".")) \
        if os.path.isdir(out) else []


@pytest.mark.slow
def test_thousand_tiny_shards_killed_at_a_random_point_then_rerun_exactly_once(ray_local, tmp_path):
    expected = _tiny_shards(tmp_path / "in")
    out = tmp_path / "out"
    cfg = {"input": str(tmp_path / "in"), "output": str(out), "stats": {"enabled": False},
           "engine": {"kind": "echo", "num_captions": 2, "batch_size": 64, "num_cpus": 0},
           "decode": {"size": 16}}
    # The first run is a separate driver joined to this session's cluster, SIGKILLed (no cleanup, no finally)
    # once a random number of shard files exist; Ray then ends that job's tasks and actors.
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(1, SHARDS // 2)
    cfg_first = {**cfg, "ray": {"address": ray_local.get_runtime_context().gcs_address}}
    code = ("import json, sys; from clipdense.config import build_config; "
            "from clipdense.recaption import RecaptionConfig, run; "
            "run(build_config(RecaptionConfig, json.loads(sys.argv[1])))")
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg_first)], stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    while len(_done(out)) < kill_after and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    assert driver.wait(60) == -signal.SIGKILL, (f"seed {seed}: the driver ended before the kill at {kill_after} "
                                                f"files:\n{(tmp_path / 'driver.log').read_text()[-3000:]}")
    first = _done(out)
    assert kill_after <= len(first) < SHARDS, f"seed {seed}"
    for name in first:  # what the killed run left is complete files only (a half-written one keeps a temp name)
        assert pq.read_table(out / name, columns=["key"]).column("key").to_pylist() == expected[name]

    summary = run(build_config(RecaptionConfig, cfg))
    assert summary["shards"] == {"total": SHARDS, "skipped_done": len(first), "written": SHARDS - len(first)}
    assert summary["rows_in"] == summary["rows_captioned"] == (SHARDS - len(first)) * PER_SHARD
    assert _done(out) == sorted(expected)  # one output per input shard
    seen = []
    for name, keys in expected.items():
        t = pq.read_table(out / name, columns=["key", "syn_captions", "error_code"])
        assert t.column("key").to_pylist() == keys, f"seed {seed}: {name}"
        assert t.column("error_code").null_count == t.num_rows
        assert t.column("syn_captions").to_pylist() == [[f"caption {k}"] * 2 for k in keys]
        seen += keys
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD  # every key exactly once across the outputs
