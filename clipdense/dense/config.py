"""FinetuneConfig: one dense finetune (segmentation | depth | detection) of one backbone on one data fraction.

A discriminated union on `task` (`AnyFinetune`): each task's config (dense/tasks/<task>/config.py) has its own
`data`, `head` and `eval` sections on top of the keys every task has (`FinetuneBase`, dense/base_config.py), so a
key of another task (`task: seg` with `head.depth_bins`) is a one-line error naming the key and the tasks that have
it. `load_config(FinetuneConfig, path, overrides)` and `build_config(FinetuneConfig, data)` load it: the result is
the task's config (`task` defaults to seg)."""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.tasks.depth.config import DepthFinetune
from clipdense.dense.tasks.det.config import DetFinetune
from clipdense.dense.tasks.seg.config import SegFinetune

AnyFinetune = Annotated[Union[SegFinetune, DepthFinetune, DetFinetune], Field(discriminator="task")]
_ANY_FINETUNE = TypeAdapter(AnyFinetune)


class FinetuneConfig:
    """The loader of `AnyFinetune` that `load_config` / `build_config` take (they call `model_validate`); it is no
    model itself: what it returns is a `SegFinetune`, `DepthFinetune` or `DetFinetune` (each a `FinetuneBase`)."""

    TASKS: dict[str, type[FinetuneBase]] = {"seg": SegFinetune, "depth": DepthFinetune, "det": DetFinetune}

    @classmethod
    def model_validate(cls, obj: Any, **kwargs) -> FinetuneBase:
        if isinstance(obj, dict) and "task" not in obj:
            obj = {**obj, "task": "seg"}
        try:
            return _ANY_FINETUNE.validate_python(obj, **kwargs)
        except ValidationError as e:
            raise _task_errors(e, obj) from None


def has_key(cls: type[BaseModel], dotted: str) -> bool:
    """Whether `a.b.c` names a key of config class `cls` (anything below a free-form dict field counts)."""
    node: Any = cls
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return node is dict
        field = _field_of_key(node, part)
        if field is None:
            return False
        node = field.annotation
        if getattr(node, "__origin__", None) is dict:
            node = dict
    return True


def _field_of_key(cls: type[BaseModel], key: str):
    """The field that YAML key `key` sets: by its alias where it has one (`train.checkpoint.storage`)."""
    by_name = cls.model_config.get("validate_by_name", False)
    return next((f for name, f in cls.model_fields.items()
                 if key == f.alias or (key == name and (f.alias is None or by_name))), None)


def tasks_with_key(dotted: str) -> list[str]:
    """The tasks whose config has the dotted key."""
    return [name for name, c in FinetuneConfig.TASKS.items() if has_key(c, dotted)]


def _task_errors(err: ValidationError, data: Any) -> ValidationError:
    """The union's errors located as in the task's own config (no leading tag), an unknown key that another task
    has named as such: 'head.depth_bins: not a key of task seg (it is one of task depth)'."""
    task = data.get("task") if isinstance(data, dict) else None
    rows = []
    for e in err.errors():
        loc = tuple(e["loc"][1:]) if e["loc"][:1] == (task,) else tuple(e["loc"])
        row = {"type": e["type"], "loc": loc, "input": e.get("input")}
        if "ctx" in e:
            row["ctx"] = e["ctx"]
        if e["type"] == "union_tag_invalid":
            row = {"type": PydanticCustomError("task", "must be one of {tasks}",
                                               {"tasks": " | ".join(FinetuneConfig.TASKS)}),
                   "loc": ("task",), "input": task}
        key = ".".join(str(p) for p in loc)
        owners = tasks_with_key(key) if e["type"] == "extra_forbidden" else []
        if owners:
            row["type"] = PydanticCustomError(
                "task_key", "not supported for task {task} (a key of task {owners})",
                {"task": task, "owners": ", ".join(owners)})
        rows.append(row)
    return ValidationError.from_exception_data(err.title, rows)
