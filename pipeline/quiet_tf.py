"""TensorFlow imported without its start-up chatter (oneDNN notices, CUDA probes on a CPU machine).

Example::

    from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
    tf = import_tensorflow_quietly()
"""

from __future__ import annotations

import os
import re
import sys

# TensorFlow's start-up lines that say nothing about the model: CPU features, the absence of a GPU.
_STARTUP_CHATTER = re.compile(
    r"oneDNN custom operations|Could not find cuda drivers|failed call to cuInit|cuda_platform\.cc|"
    r"cudart_stub\.cc|All log messages before absl::InitializeLog|This TensorFlow binary is optimized|"
    r"rebuild TensorFlow with the appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|Attempting to register factory|TF-TRT Warning|"
    r"cpu_feature_guard\.cc|port\.cc:\d+\] oneDNN")


# The process whose first TensorFlow op ran under the filter: a forked child runs its own first op.
_QUIETED_PID: int | None = None


def import_tensorflow_quietly():
    """Import TensorFlow with its start-up chatter (oneDNN, CUDA probes on a CPU machine) kept off stderr.

    TensorFlow's C++ logs before absl is initialised ignore TF_CPP_MIN_LOG_LEVEL,
    so stderr's file descriptor is pointed at a temporary file for the import
    and the first op, then restored; what it caught that is not start-up
    chatter is written back to stderr, so real warnings still show.
    The CUDA probe runs at the first op, not at the import, so a process that
    found TensorFlow already imported (by a model factory, or by the parent it
    was forked from) still runs its first op under the filter.
    ``TF_EXPORT_VERBOSE=1`` keeps everything.
    """
    global _QUIETED_PID
    if os.environ.get("TF_EXPORT_VERBOSE") or _QUIETED_PID == os.getpid():
        import tensorflow as tf

        return tf
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    caught = tempfile.TemporaryFile()
    try:
        os.dup2(caught.fileno(), 2)
        import tensorflow as tf

        tf.constant(0) + 0
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        caught.seek(0)
        kept = [line for line in caught.read().decode("utf-8", "replace").splitlines()
                if line.strip() and not _STARTUP_CHATTER.search(line)]
        caught.close()
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
            sys.stderr.flush()
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _QUIETED_PID = os.getpid()
    return tf


def import_modules_silently(names: tuple[str, ...]) -> None:
    """Import ``names`` with stderr's file descriptor pointed at /dev/null, running no TensorFlow op.

    For a process that imports TensorFlow ahead of the work that will use it and
    then forks (a Celery worker before its pool, a process forking commands):
    no op means no TensorFlow thread pool for the fork to copy, and the
    import's start-up lines belong to no command, so they go nowhere. Each
    forked process's first op still runs under :func:`import_tensorflow_quietly`.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        for name in names:
            __import__(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

