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
import sys


def _import_quietly(names: tuple[str, ...]) -> None:
    # TensorFlow's C++ start-up lines ignore Python's logging; its stderr descriptor is pointed away.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        for name in names:
            __import__(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


#: What every export and validate task imports: TensorFlow, Keras and the stages over them.
PRELOADED = ("tensorflow", "keras", "tf_export_pipeline.stages")

_import_quietly(PRELOADED)
