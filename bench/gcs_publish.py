"""Benchmark: publishing a ~100 MB SavedModel to gs://, this pipeline beside the seed's way.

Run from the repository root::

    .venv/bin/python bench/gcs_publish.py                 # print the figures
    .venv/bin/python bench/gcs_publish.py --write bench/RESULTS.md

Everything runs against a real GCS server (``fake-gcs-server``, in memory) on
loopback, reached through a counting HTTP proxy (tests/support/fault_proxy.py,
injecting no faults here), so bytes and requests are what went over the wire.

- **This pipeline** (flat bucket): upload staging once (each file checked
  against the server's crc32c), download it for validation, then
  ``Publisher.publish``: claim, manifest, ledger entry, ``ObjectMove``
  (server-side rewrites, concurrently, ``saved_model.pb`` last, sources
  deleted after).
- **The seed's way**: upload into ``temp-<ts>`` as ``gfile`` would (each file
  once), then ``gfile.Rename`` as TensorFlow does it on GCS: per object, in
  name order, one server-side rewrite then one delete.

The model is a ``tf.Module`` with one float32 variable of about ``--mb`` MiB
and a matmul serving signature.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.publish_common import build_inputs, mib, run_ours, snapshot, upload_as_seed, write_section  # noqa: E402 - importable once REPO is on sys.path

HEADING = "## Cloud storage publish"


def run_seed(fs, proxy, bucket: str, model_dir: str, version: int) -> dict:
    temp = f"{bucket}/seed/temp-{int(time.time())}{version}"
    final = f"{bucket}/seed/{version}"
    upload = upload_as_seed(fs, proxy, model_dir, temp)

    proxy.reset_counters()
    started = time.monotonic()
    objects = sorted(fs.find(temp, detail=True).items())
    marker_at = None
    copied = 0
    for path, info in objects:
        rel = path[len(temp) + 1:]
        fs.cp_file(path, f"{final}/{rel}")  # one rewrite request, as TF issues it
        copied += int(info["size"])
        if rel == "saved_model.pb":
            marker_at = time.monotonic()
        fs.rm_file(path)
    ended = time.monotonic()
    rename = {**snapshot(proxy), "seconds": ended - started, "bytes_copied": copied,
              # TF Serving can list the version with saved_model.pb while files are still missing
              "marked_partial_seconds": (ended - marker_at) if marker_at else 0.0}
    fs.rm(final, recursive=True)
    return {"upload": upload, "rename": rename}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="variable size in MiB (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="publishes per way (default 3)")
    parser.add_argument("--write", metavar="RESULTS_MD", help="write the figures into this Markdown file")
    args = parser.parse_args(argv)

    from tests.support.fault_proxy import FaultProxy
    from tests.support.gcs_emulator import GcsEmulator, make_fs
    from tf_export_pipeline.storage import open_storage

    tmp = tempfile.mkdtemp(prefix="bench-gcs-")
    inputs = build_inputs(tmp, args.mb)
    model_dir, work_dir = inputs["model_dir"], inputs["work_dir"]
    size, work_size, files = inputs["size"], inputs["work_size"], inputs["files"]

    ours, seed = [], []
    with GcsEmulator() as server:
        bucket = server.create_bucket()
        with FaultProxy(server.url, lifetime=3600, max_requests=10**6) as proxy:
            options = dict(server.storage_options(), endpoint_url=proxy.url)
            store = open_storage(f"gs://{bucket}/models/big", options)
            fs = make_fs(options)
            for i in range(args.repeat):
                seed.append(run_seed(fs, proxy, bucket, model_dir, 1000 + i))
                ours.append(run_ours(store, proxy, model_dir, work_dir, 2000 + i))
                # keep the in-memory server small: drop what this round published
                server.delete_bucket(bucket)
                server.create_bucket(bucket)
    shutil.rmtree(tmp, ignore_errors=True)

    o, s = ours[-1], seed[-1]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    o_requests = o["upload"]["requests"] + o["publish"]["requests"]
    s_requests = s["upload"]["requests"] + s["rename"]["requests"]
    figures = {
        "savedmodel_bytes": size, "files": files, "work_bytes": work_size, "repeat": args.repeat,
        "ours": {
            "strategy": o["strategy"],
            "uploaded_bytes": o["upload"]["bytes_in"] + o["publish"]["bytes_in"],
            "upload_ratio": (o["upload"]["bytes_in"] + o["publish"]["bytes_in"]) / size,
            "server_side_copied": o["promotion"]["bytes_copied"],
            "requests_per_publish": o_requests,
            "requests_upload": o["upload"]["requests"], "requests_publish": o["publish"]["requests"],
            "requests_promotion": o["promotion_requests"],
            "promotion_seconds": med([r["promotion"]["seconds"] for r in ours]),
            "publish_seconds": med([r["publish"]["seconds"] for r in ours]),
            "upload_seconds": med([r["upload"]["seconds"] for r in ours]),
            "validation_download_bytes": o["validation"]["bytes_out"],
            "validation_requests": o["validation"]["requests"],
        },
        "seed": {
            "uploaded_bytes": s["upload"]["bytes_in"] + s["rename"]["bytes_in"],
            "upload_ratio": (s["upload"]["bytes_in"] + s["rename"]["bytes_in"]) / size,
            "server_side_copied": s["rename"]["bytes_copied"],
            "requests_per_publish": s_requests,
            "requests_upload": s["upload"]["requests"], "requests_rename": s["rename"]["requests"],
            "promotion_seconds": med([r["rename"]["seconds"] for r in seed]),
            "upload_seconds": med([r["upload"]["seconds"] for r in seed]),
            "marked_partial_seconds": med([r["rename"]["marked_partial_seconds"] for r in seed]),
        },
    }
    text = render(figures)
    print(text)
    print(json.dumps(figures, indent=1), file=sys.stderr)
    if args.write:
        write_section(args.write, text, HEADING)
    return 0


def render(f: dict) -> str:
    o, s = f["ours"], f["seed"]
    rows = [
        ("bytes uploaded per publish / SavedModel size", f"{o['upload_ratio']:.4f}", f"{s['upload_ratio']:.4f}"),
        ("bytes copied server-side during promotion", mib(o["server_side_copied"]), mib(s["server_side_copied"])),
        ("requests per publish (upload + publish)", f"{o['requests_per_publish']} "
         f"({o['requests_upload']} + {o['requests_publish']})",
         f"{s['requests_per_publish']} ({s['requests_upload']} + {s['requests_rename']})"),
        ("requests of the promotion itself", str(o["requests_promotion"]), str(s["requests_rename"])),
        ("promotion time (median)", f"{o['promotion_seconds'] * 1000:.0f} ms",
         f"{s['promotion_seconds'] * 1000:.0f} ms"),
        ("time a version with saved_model.pb but missing files is listable", "0 (marker copied last)",
         f"{s['marked_partial_seconds'] * 1000:.0f} ms"),
        ("bytes downloaded to validate staging", mib(o["validation_download_bytes"]), "none (no validation)"),
    ]
    lines = [
        HEADING,
        "",
        f"`bench/gcs_publish.py`: a SavedModel of {mib(f['savedmodel_bytes'])} ({f['files']} files, one float32 "
        f"variable) published {f['repeat']} times each way to a flat bucket of fake-gcs-server (in memory, "
        "loopback), through a counting proxy. Bytes and requests are those of the last round (every round gives "
        "the same); times are medians.",
        "",
        f"| per publish | this pipeline (`{o['strategy']}`) | seed: upload `temp-<ts>`, then gfile.Rename-style "
        "copy-and-delete |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"- Uploaded bytes include the request framing, the staging crc32c check's listing, the claim, the "
        f"manifest, the ledger entry and the validation inputs ({f['work_bytes'] / 1024:.0f} KiB): the "
        "SavedModel itself goes over the wire once.",
        "- Promotion sends no object bytes through the client either way: both are server-side rewrites. On a "
        "flat bucket this pipeline copies as many bytes server-side as the seed; what it changes is the order "
        "(`saved_model.pb` strictly last, create-only destinations) and the concurrency (one round of parallel "
        "rewrites, then the marker, then parallel generation-matched deletes, instead of rewrite+delete per "
        "object in turn).",
        "- In a bucket with hierarchical namespace, promotion is one folder rename: no bytes copied, one request "
        "plus operation polls. The emulator has no folders API, so that figure is not measured here.",
        "",
        "What the emulator lacks, and what it means on real GCS:",
        "",
        "- No `objects.move` (gcsfs's `mv` gets a 400 and falls back to rewrite+delete) and no "
        "`storageLayout`/folders API: promotion there is always `object_move`. On real GCS a same-location, "
        "same-class rewrite completes in one call per object without data through the client; each rewrite and "
        "delete is an operation billed per object.",
        "- It enforces `ifGenerationMatch` only on multipart uploads (claims, ledger, manifest), not on rewrites, "
        "deletes or resumable uploads. Real GCS answers 412 there; the code handles it (a rewrite whose 412 finds "
        "an identical object counts as done; a delete whose 412 shows a newer generation leaves the object), "
        "but those branches are not exercised by the emulator. The explicit existence checks before the copies "
        "and before `saved_model.pb` are what guard the emulator runs.",
        "- Its in-memory backend copies at memory speed, so the times above are lower bounds; on real GCS each "
        "request costs a round trip of tens of milliseconds, which weighs on the seed's sequential "
        "rewrite+delete per object far more than on one concurrent round.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
