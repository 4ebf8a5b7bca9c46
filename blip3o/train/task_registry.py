"""The training-task registry (``train.task`` in the YAML). Every task registers where it is defined::

    @TASKS.register("t2i")
    class T2ITask: ...

It lives apart from the tasks so that task modules (``tasks.py``, ``clip_task.py``) can all register without
importing each other; ``blip3o.train.tasks`` imports every task module and is where callers get them
(``from blip3o.train.tasks import TASKS, get_task``).
"""
from __future__ import annotations

from blip3o.registry import Registry

TASKS: Registry[type] = Registry("train.task")
