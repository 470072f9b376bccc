"""What the publish benchmarks share (bench/gcs_publish.py, bench/store_publish.py).

The model they publish, this pipeline's publish as a run does it (upload
staging, download it for validation, ``Publisher.publish``), the counters of
the proxy in front of the server, and the replacement of one section of
bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager


def build_model(directory: str, mib: float) -> int:
    """Write a SavedModel with one ~``mib`` MiB variable; returns its size in bytes."""
    from tf_export_pipeline.quiet_tf import import_tensorflow_quietly

    tf = import_tensorflow_quietly()
    n = int(math.sqrt(mib * 2**20 / 4))

    class Big(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([n, n], seed=[1, 2]), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, n], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w)}

    m = Big()
    tf.saved_model.save(m, directory, signatures={"serving_default": m.__call__.get_concrete_function()})
    return tree_size(directory)


def build_inputs(directory: str, mib: float) -> dict:
    """The SavedModel and the validation inputs a run uploads beside it, under ``directory``."""
    import numpy as np

    model_dir, work_dir = os.path.join(directory, "model"), os.path.join(directory, "work")
    size = build_model(model_dir, mib)
    os.makedirs(work_dir)
    n = int(math.sqrt(mib * 2**20 / 4))
    np.savez(os.path.join(work_dir, "samples.npz"), x=np.zeros((2, n), "float32"))
    np.savez(os.path.join(work_dir, "expected.npz"), y=np.zeros((2, n), "float32"))
    return {"model_dir": model_dir, "work_dir": work_dir, "size": size, "work_size": tree_size(work_dir),
            "files": sum(len(f) for _, _, f in os.walk(model_dir))}


def tree_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


def snapshot(proxy) -> dict:
    c = proxy.counters
    return {"requests": c.requests, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}


def upload_as_seed(fs, proxy, model_dir: str, temp: str) -> dict:
    """The seed's upload: each file of ``model_dir`` put once under ``temp``; requests, bytes and seconds."""
    proxy.reset_counters()
    started = time.monotonic()
    for d, _, files in os.walk(model_dir):
        for f in sorted(files):
            local = os.path.join(d, f)
            fs.put_file(local, f"{temp}/{os.path.relpath(local, model_dir)}")
    return {**snapshot(proxy), "seconds": time.monotonic() - started}


def run_ours(store, proxy, model_dir: str, work_dir: str, version: int, *,
             checkpoint_prefix: str = "gs://bench/train/ckpt-1",
             watch: AbstractContextManager | None = None,
             server_bytes: Callable[[], int] | None = None) -> dict:
    """Upload staging and the validation inputs, download them, publish; counters of each phase.

    ``watch`` is entered just before ``Publisher.publish`` and left after it;
    ``server_bytes`` (what the server holds on disk) is read just before and
    after the promotion.
    """
    from tf_export_pipeline.checkpoints import Checkpoint
    from tf_export_pipeline.layout import MANIFEST
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.publish.staging import file_list

    name = f"temp-{int(time.time())}-{version:08x}"
    staging = store.join(store.root, name)
    work = store.join(store.root, "_exports", "work", name)

    proxy.reset_counters()
    started = time.monotonic()
    store.upload_dir(work_dir, work)
    store.upload_dir(model_dir, staging)
    upload = {**snapshot(proxy), "seconds": time.monotonic() - started}

    proxy.reset_counters()
    scratch = tempfile.mkdtemp(prefix="bench-validate-")
    try:
        store.download_dir(staging, os.path.join(scratch, "model"))
        store.download_dir(work, os.path.join(scratch, "work"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    validation = snapshot(proxy)

    proxy.reset_counters()
    started = time.monotonic()
    ckpt = Checkpoint(prefix=checkpoint_prefix, name="ckpt-1", step=version, written_at=time.time(),
                      complete=True, index_size=1, index_crc32c="AAAAAA==")
    pub = Publisher(store)
    inner, marks = pub.strategy.promote, {}

    def counted(*a):
        marks["before"] = len(proxy.log)
        disk = server_bytes() if server_bytes else 0
        inner(*a)
        marks["after"] = len(proxy.log)
        marks["disk"] = (server_bytes() - disk) if server_bytes else None

    pub.strategy.promote = counted
    files = {k: v for k, v in file_list(model_dir).items() if k != MANIFEST}  # made at export, as a run does
    with watch or contextlib.nullcontext():
        rec = pub.publish(staging=staging, files=files, checkpoint=ckpt, ledger_key=f"bench-{version}",
                          config_hash="bench", versioning="step", max_claim_attempts=3, validation={"ok": True})
    log = list(proxy.log)
    store.rm(work, recursive=True)
    publish = {**snapshot(proxy), "seconds": time.monotonic() - started}
    assert rec["status"] == "published", rec
    promotion_requests = marks["after"] - marks["before"]
    return {"upload": upload, "validation": validation, "publish": publish,
            "promotion": dict(pub.strategy.stats), "strategy": pub.strategy.name,
            "promotion_requests": promotion_requests, "promotion_disk_bytes": marks["disk"],
            "version": rec["version"], "publish_log": log, "promotion_span": (marks["before"], marks["after"])}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_section(path: str, text: str, heading: str) -> None:
    """Replace (or append) the section under ``heading``, leaving the rest of the file alone."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(heading))
        tail = old[nxt + 1:] if nxt >= 0 else ""
        new = old[:start] + text + ("\n" + tail if tail else "")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)
