"""Tasks, one module each, registered by name in :data:`TASKS` (see :mod:`nas.tasks.base` for the interface).

``language_modeling`` (PTB, WikiText-2; perplexity) and ``classification`` (SST-2; accuracy).  A run config names
its task through ``dataset.task``; :func:`make_task` returns it.
"""
from nas.registry import import_modules
from nas.tasks.base import TASKS, Step, StepResult, Task, make_task, task_name  # noqa: F401

import_modules(__name__, __path__)  # every module of the package registers itself: adding one is adding its file
