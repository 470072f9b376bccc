"""Imported once by a Celery worker before its pool forks (see :mod:`tf_export_pipeline.operators.celery_worker`).

Only modules are imported: no TensorFlow op runs here, so no TensorFlow thread
pool exists yet when the pool and the task processes fork from this one (a
pool that a fork copied would be unusable in the child). The first op of each
task then runs in the task's own process, where
:func:`tf_export_pipeline.quiet_tf.import_tensorflow_quietly` keeps its start-up
chatter off the task log. What the import prints at start-up goes nowhere: it
belongs to no task.
"""

from __future__ import annotations

import os

from tf_export_pipeline.quiet_tf import import_modules_silently

#: What every export and validate task imports: TensorFlow, Keras and the stages over them.
PRELOADED = ("tensorflow", "keras", "tf_export_pipeline.stages")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the tasks' own TensorFlow logs: warnings and up
import_modules_silently(PRELOADED)
