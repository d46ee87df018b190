"""Reading what trackers wrote, for the tests: W&B offline run files."""
from __future__ import annotations

from pathlib import Path


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: wandb's own reader left the SDK (0.31), so the framing (LevelDB's
    log: 7-byte header, 32 KiB blocks, chunks of crc32 + length + type) is read here, the records by wandb's proto."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, out, block = path.read_bytes(), 7, b"", [], 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def finished_wandb_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of an offline W&B run once it has ended (its `exit` record is written): wandb's service process
    may still be writing the file after `finish()` returned."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def wandb_history(records: list) -> list[dict]:
    """The logged rows of a W&B run, one {metric: value} per `log` call."""
    import json

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            rows.append({"_step": r.history.step.num, **row})
    return rows
