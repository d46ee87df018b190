"""The teacher actor pool of the recaption pipeline (after the captioners): per row, k augmented views and every
teacher's embeddings of them and of the captions, carried to the driver's writer as `param_aug` (JSON) and
`teacher_npz` (DataCompDR's npz) columns, with the `uid` and `sha256` DataCompDR's json member holds.

Light at import: pipeline.py (which the vLLM actors import, in a venv without torch or open_clip) names this class;
the torch side (teacher_forward.py) is imported when an actor starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

import pyarrow as pa

from clipdense.data.datacompdr import json_or_none
from clipdense.data.rows import error_columns, errors_from, exception_detail, row_error
from clipdense.recaption.config import TeachersConfig

if TYPE_CHECKING:  # torch's side: absent where the vLLM actors import this module
    from clipdense.recaption.views import ViewBatch

log = logging.getLogger(__name__)

TEACHER_COLUMNS = {"syn_kept": pa.list_(pa.int32()),  # rerank: which candidates were kept, best first
                   "uid": pa.string(), "sha256": pa.string(), "param_aug": pa.string(), "teacher_npz": pa.binary(),
                   "caption_score": pa.float32(), "syn_scores": pa.list_(pa.float32())}


class TeacherLoadError(RuntimeError):
    """A teacher could not be built in its actor."""


def uid_and_sha(meta: str | None, key: str, image: bytes) -> tuple[str, str]:
    """DataComp's img2dataset json carries the uid and the original image's sha256; without a uid the key stands
    in (the join falls back to the key alike), without a sha256 the one of the bytes read."""
    obj = json_or_none(meta)
    obj = obj if isinstance(obj, dict) else {}
    uid, sha = obj.get("uid"), obj.get("sha256")
    return (str(uid) if uid is not None else key), (str(sha) if sha else hashlib.sha256(image).hexdigest())


class TeacherActor:
    """Every teacher loaded once per actor. Rows already in error pass through; a failing forward gives its rows
    the row error `teacher_failed`."""

    def __init__(self, teachers: dict, max_image_pixels: int, keep_images: bool = False, keep: int | None = None):
        # local: torch and open_clip, absent from the vLLM actors' venv that imports this module through pipeline.py
        from clipdense.recaption.teacher_forward import TeacherForward

        self.cfg = TeachersConfig(**teachers)
        self.max_image_pixels, self.keep_images, self.keep = max_image_pixels, keep_images, keep
        try:
            self.forward = TeacherForward(self.cfg)
        except Exception as e:  # only a message crosses back to the driver
            names = ", ".join(t.name for t in self.cfg.models)
            raise TeacherLoadError(f"teachers.models ({names}) did not load: {exception_detail(e)}") from None

    def __call__(self, batch: pa.Table, drawn: ViewBatch | None = None) -> pa.Table:
        """`drawn`: the rows' views, when the caller drew them already (aligned with `batch`, rows in error
        included)."""
        errors = errors_from(batch)
        ok = [i for i, e in enumerate(errors) if e is None]
        cols = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * batch.num_rows
                for c in ("key", "caption", "syn_captions", "image_bytes", "meta", "shard")}
        extra = {c: [None] * batch.num_rows for c in TEACHER_COLUMNS}
        if ok:
            try:
                drawn = drawn.take(ok) if drawn is not None else self.forward.drawer(self.max_image_pixels)(
                    [cols["image_bytes"][i] for i in ok], [str(cols["key"][i]) for i in ok])
                if self.keep:  # best-of-N: the kept candidates replace the row's captions
                    self.rerank(cols, ok, extra, drawn.scorer_input())
                done = self.forward.rows(drawn, [cols["caption"][i] for i in ok],
                                         [cols["syn_captions"][i] for i in ok])
            except Exception as e:  # any failure of the forward (decode, OOM) is recorded on its rows
                log.warning("teacher forward failed: %s", e)
                for i in ok:
                    errors[i] = row_error("teacher_failed", exception_detail(e), cols["shard"][i])
                done = []
            for i, r in zip(ok, done):
                extra["uid"][i], extra["sha256"][i] = uid_and_sha(cols["meta"][i], str(cols["key"][i]),
                                                                  cols["image_bytes"][i])
                extra["param_aug"][i], extra["teacher_npz"][i] = json.dumps(r.param_aug), r.npz
                extra["caption_score"][i], extra["syn_scores"][i] = r.scores[0], r.scores[1:]
        out = {"key": batch.column("key"), "caption": batch.column("caption"),
               "syn_captions": pa.array(cols["syn_captions"], pa.list_(pa.string()))}
        out.update(error_columns(errors))
        out["shard"] = batch.column("shard")
        out.update({c: pa.array(v, TEACHER_COLUMNS[c]) for c, v in extra.items()})
        if self.keep_images:
            out["image_bytes"] = batch.column("image_bytes")
        return pa.table(out)

    def rerank(self, cols: dict, ok: list[int], extra: dict, scored) -> None:
        """Keep each row's `keep` best candidates (in `cols`, in place), recording their indices in `syn_kept`."""
        kept = self.forward.rerank(scored, [cols["syn_captions"][i] for i in ok], self.keep)
        for i, idx in zip(ok, kept):
            extra["syn_kept"][i] = idx
            cols["syn_captions"][i] = [cols["syn_captions"][i][j] for j in idx]
