"""Loaded only by the chaos suite's child processes (its folder is put first on PYTHONPATH).

When ``TF_CHAOS_STACKS`` names a file, SIGUSR1 makes the process write the
Python stack of every thread into it (``faulthandler``, from the C signal
handler: immediate, even while a thread is inside TensorFlow). The chaos
driver sends SIGUSR1 just before it SIGKILLs the process group, to tell which
phase the kill interrupted. The variable is dropped at once, so children (the
validation process) do not take it up.
"""

import os

_path = os.environ.pop("TF_CHAOS_STACKS", None)
if _path:
    import faulthandler
    import signal

    _stacks = open(_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process
    faulthandler.register(signal.SIGUSR1, file=_stacks, all_threads=True)
    _stacks.write("ready\n")
    _stacks.flush()
