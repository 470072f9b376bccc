"""Benchmark: publishing a ~100 MB SavedModel to s3:// and az://, this pipeline beside the seed's way.

Run from the repository root::

    .venv/bin/python bench/store_publish.py                  # both stores, print the figures
    .venv/bin/python bench/store_publish.py --store s3 --quick
    .venv/bin/python bench/store_publish.py --write bench/RESULTS.md

What bench/gcs_publish.py does for GCS, for S3 (SeaweedFS, tests/support/s3_server.py) and Azure Blob
Storage (Azurite, tests/support/azurite.py): each server runs on loopback with its data on local disk and
is reached through a counting HTTP proxy (tests/support/fault_proxy.py, injecting no faults here,
forwarding the client's own Host header), so bytes and requests are what went over the wire. Every
request goes through the proxy, Azure's Copy Blob included: its source URL names the proxy, which Azurite
accepts, since the source is in the account the request is for and carries no SAS (Azurite verifies a
copy source only for another account or a SAS, by asking the source's host, which must then be the
Host of the request). The proxy adds no Content-Type to a request that has none: Azure's Shared Key
signature covers that header, and Azurite refuses a request whose signature it breaks.

- **This pipeline**: upload staging once (S3: each body checked by the server against its Content-MD5
  and CRC32C; Azure: against its Content-MD5), download it for validation, then ``Publisher.publish``:
  claim, manifest, ledger entry, ``ObjectMove`` (server-side CopyObject / Copy Blob, concurrently, each
  destination ``If-None-Match: *`` and each source matched to its listed ETag, ``saved_model.pb`` last,
  then the sources deleted, each matched to its ETag).
- **The seed's way**: upload each file into ``temp-<ts>/`` with ``fs.put_file``, then rename it as
  copy-then-delete, per object in name order, through the same fsspec filesystem the pipeline opens
  (s3fs, adlfs): ``fs.copy`` then ``fs.rm``.

Two figures are not counted by the proxy:

- *Bytes copied server-side during promotion* are derived: the proxy sees a copy request, not what the
  server does with it, so they are the sizes of the objects copied (ObjectMove's own count of the copies
  it made; the seed's listing of ``temp-<ts>``). Beside them, measured: how much the server's blob data
  files (SeaweedFS's volume ``.dat`` files, Azurite's extent files) grew during the promotion, which
  tells a copy of the bytes from a new reference to the same bytes.
- *The window during which a version is listed while not whole*: a watcher thread, on a connection of
  its own straight to the server (not counted), lists the base as TF Serving does (every integer-named
  child) and then each such child's files, over and over; each listing that finds a version that is
  not whole counts the time until the next listing. Its resolution is one listing (a few milliseconds).

The model is the one of bench/gcs_publish.py (bench/publish_common.py): a ``tf.Module`` with one float32
variable of about ``--mb`` MiB and a matmul serving signature. The figures go to stdout as Markdown and to
stderr as JSON, there with the requests of each way by kind (method and path, names of staging and
versions replaced by placeholders).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.publish_common import build_inputs, mib, run_ours, snapshot, upload_as_seed, write_section  # noqa: E402 - importable once REPO is on sys.path

HEADING = "## S3 and Azure publish"
POLL_PAUSE = 0.002  # between two listings of the watcher: it shares the CPUs with the server and the client

ABSENT, WHOLE, INCOMPLETE, INCOMPLETE_MARKED = "absent", "whole", "incomplete", "incomplete with saved_model.pb"


@dataclass
class Site:
    """A running server, one bucket (container) of it, and how to reach it."""

    key: str  # "s3" or "azure"
    title: str  # the server, as the results name it
    scheme: str
    bucket: str
    upstream: str  # what the proxy forwards to
    direct_options: dict
    through: Callable[[str], dict]  # storage options that reach the server through a proxy at this URL
    reset: Callable[[], None]  # empty the bucket
    data_bytes: Callable[[], int]  # bytes in the server's blob data files

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *parts])


def files_bytes(root: Path, keep: Callable[[Path], bool]) -> int:
    total = 0
    for d, _, names in os.walk(root):
        for name in names:
            path = Path(d, name)
            if keep(path):
                with contextlib.suppress(FileNotFoundError):  # a volume or extent removed meanwhile
                    total += path.stat().st_size
    return total


@contextlib.contextmanager
def seaweedfs() -> Iterator[Site]:
    from tests.support.s3_server import SeaweedS3, find_binary

    out = subprocess.run([str(find_binary()), "version"], capture_output=True, text=True, timeout=30).stdout
    version = re.search(r"\b(\d+\.\d+)\b", out)
    title = f"SeaweedFS {version.group(1)}" if version else "SeaweedFS"
    with SeaweedS3() as server:
        bucket = server.create_bucket()

        def reset() -> None:
            # Deleting the bucket drops its volumes with it, which keeps the disk small across rounds.
            server.delete_bucket(bucket)
            server.create_bucket(bucket)

        yield Site("s3", title, "s3", bucket, server.url, server.storage_options(),
                   lambda url: dict(server.storage_options(), endpoint_url=url), reset,
                   lambda: files_bytes(server.workdir / "data", lambda p: p.suffix == ".dat"))


@contextlib.contextmanager
def azurite() -> Iterator[Site]:
    from azure.storage.blob import BlobServiceClient

    from tests.support.azurite import Azurite, connection_string

    try:
        package = json.loads((Path(REPO) / ".tools/azurite/node_modules/azurite/package.json").read_text())
        title = f"Azurite {package['version']}"
    except (OSError, ValueError, KeyError):
        title = "Azurite"
    with Azurite() as server:
        service = BlobServiceClient.from_connection_string(server.connection_string)
        container = service.create_container(f"bench{uuid.uuid4().hex[:12]}")

        def reset() -> None:
            for blob in container.list_blobs():
                container.delete_blob(blob.name)

        try:
            yield Site("azure", title, "az", container.container_name, f"http://127.0.0.1:{server.port}",
                       {"connection_string": server.connection_string},
                       lambda url: {"connection_string": connection_string(f"{url}/devstoreaccount1")}, reset,
                       lambda: files_bytes(Path(server.location), lambda p: "__blobstorage__" in p.parts))
        finally:
            service.close()


SITES = {"s3": seaweedfs, "azure": azurite}
NAMES = {"s3": "S3", "azure": "Azure Blob Storage"}


class Watcher:
    """Lists ``base`` as TF Serving does, over and over, on its own connection to the server.

    Each listing takes the integer-named children of ``base``, lists each one's files and compares them
    with ``expected``; it records the worst it saw (an incomplete version with ``saved_model.pb`` above one
    without, above a whole one).
    """

    def __init__(self, store, base: str, expected: set[str]):
        self.store, self.base, self.expected = store, base, expected
        self.polls: list[tuple[float, str]] = []
        self.errors = 0
        self.ended = 0.0
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="serving-watcher", daemon=True)
        self._thread.start()
        self._first.wait(30)  # its first listing precedes anything it is to see
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        self.ended = time.monotonic()

    def _run(self) -> None:
        from tf_export_pipeline.layout import SAVED_MODEL_PB

        rank = [ABSENT, WHOLE, INCOMPLETE, INCOMPLETE_MARKED]
        while not self._stop.is_set():
            started = time.monotonic()
            seen = ABSENT
            try:
                for entry in self.store.list_dir(self.base):
                    if not (entry.is_dir and entry.name.isdigit()):
                        continue
                    names = {e.name for e in self.store.walk(entry.path)}
                    state = WHOLE if self.expected <= names else \
                        INCOMPLETE_MARKED if SAVED_MODEL_PB in names else INCOMPLETE
                    seen = max(seen, state, key=rank.index)
            except Exception:  # noqa: BLE001 - a listing that failed says nothing; counted apart
                self.errors += 1
                seen = "error"
            self.polls.append((started, seen))
            self._first.set()
            time.sleep(POLL_PAUSE)

    def seconds(self, *states: str) -> float:
        """Time from each listing that saw one of ``states`` to the next listing (or the end)."""
        times = [t for t, _ in self.polls] + [self.ended]
        return sum(times[i + 1] - times[i] for i, (_, s) in enumerate(self.polls) if s in states)

    def summary(self) -> dict:
        return {"listings": len(self.polls), "errors": self.errors,
                "states": dict(Counter(s for _, s in self.polls)),
                "incomplete_seconds": self.seconds(INCOMPLETE, INCOMPLETE_MARKED),
                "incomplete_marked_seconds": self.seconds(INCOMPLETE_MARKED)}


def run_seed(fs, proxy, base: str, model_dir: str, version: int, watcher: Watcher,
             server_bytes: Callable[[], int]) -> dict:
    temp = f"{base}/temp-{int(time.time())}{version}"
    final = f"{base}/{version}"
    upload = upload_as_seed(fs, proxy, model_dir, temp)

    proxy.reset_counters()
    with watcher:
        disk = server_bytes()
        started = time.monotonic()
        objects = sorted(fs.find(temp, detail=True).items())
        copied = 0
        for path, info in objects:
            fs.copy(path, f"{final}/{path[len(temp) + 1:]}")
            copied += int(info["size"])
            fs.rm(path)
        ended = time.monotonic()
        disk = server_bytes() - disk
    rename = {**snapshot(proxy), "seconds": ended - started, "bytes_copied": copied, "disk_bytes": disk}
    return {"upload": upload, "rename": rename, "watch": watcher.summary(), "log": list(proxy.log)}


def request_kind(method: str, raw: str, site: Site) -> str:
    """A request named by what it touches: the bucket, staging and version numbers replaced by placeholders."""
    path, _, query = raw.partition("?")

    def shape(p: str) -> str:
        p = unquote(p).strip("/")
        for head in ("devstoreaccount1/", f"{site.bucket}/", site.bucket):
            if p.startswith(head):
                p = p[len(head):]
        parts = ["<staging>" if re.match(r"temp-\d", s) else "<n>" if s.isdigit() else s for s in p.split("/")]
        return "/".join(parts)

    params = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in ("prefix",):
            params.append(f"{k}={shape(v)}/")
        elif k in ("comp", "restype", "x-id", "delimiter", "list-type"):
            params.append(f"{k}={v}")
        elif k not in ("uploadId", "partNumber", "blockid", "continuation-token", "marker", "maxresults",
                       "max-keys", "include", "encoding-type", "fetch-owner", "timeout", "blocklisttype"):
            params.append(k)
    return f"{method} /{shape(path)}" + (f"?{'&'.join(params)}" if params else "")


def kinds(log, site: Site) -> dict[str, int]:
    return dict(sorted(Counter(request_kind(e.method, e.path, site) for e in log).items()))


def measure(site: Site, inputs: dict, rounds: int) -> dict:
    from tests.support.fault_proxy import FaultProxy
    from tf_export_pipeline.layout import MANIFEST
    from tf_export_pipeline.publish.staging import file_list
    from tf_export_pipeline.storage import open_storage

    model_dir, work_dir = inputs["model_dir"], inputs["work_dir"]
    expected = set(file_list(model_dir))
    watching = open_storage(site.url(), site.direct_options)
    ours, seed = [], []
    with FaultProxy(site.upstream, keep_host=True, lifetime=3600, max_requests=10**6) as proxy:
        store = open_storage(site.url("models", "big"), site.through(proxy.url))
        seed_base = f"{site.bucket}/seed"
        for i in range(rounds):
            seed.append(run_seed(store.fs, proxy, seed_base, model_dir, 1000 + i,
                                 Watcher(watching, seed_base, expected), site.data_bytes))
            watcher = Watcher(watching, store.root, expected | {MANIFEST})
            ours.append(run_ours(store, proxy, model_dir, work_dir, 2000 + i,
                                 checkpoint_prefix=site.url("train", "ckpt-1"), watch=watcher,
                                 server_bytes=site.data_bytes))
            ours[-1]["watch"] = watcher.summary()
            site.reset()

    size = inputs["size"]
    o, s = ours[-1], seed[-1]
    # once per process and export base (storage check) or bucket (S3's create-only probe)
    first_round_extra = ours[0]["publish"]["requests"] - o["publish"]["requests"] if rounds > 1 else None
    med = lambda xs: statistics.median(xs)  # noqa: E731
    start, end = o["promotion_span"]
    return {
        "title": site.title,
        "first_round_extra_requests": first_round_extra,
        "ours": {
            "strategy": o["strategy"],
            "uploaded_bytes": o["upload"]["bytes_in"] + o["publish"]["bytes_in"],
            "upload_ratio": (o["upload"]["bytes_in"] + o["publish"]["bytes_in"]) / size,
            "server_side_copied": o["promotion"]["bytes_copied"],
            "server_data_written": o["promotion_disk_bytes"],
            "requests_per_publish": o["upload"]["requests"] + o["publish"]["requests"],
            "requests_upload": o["upload"]["requests"], "requests_publish": o["publish"]["requests"],
            "requests_promotion": o["promotion_requests"],
            "promotion_seconds": med([r["promotion"]["seconds"] for r in ours]),
            "publish_seconds": med([r["publish"]["seconds"] for r in ours]),
            "upload_seconds": med([r["upload"]["seconds"] for r in ours]),
            "incomplete_seconds": med([r["watch"]["incomplete_seconds"] for r in ours]),
            "incomplete_marked_seconds": med([r["watch"]["incomplete_marked_seconds"] for r in ours]),
            "watch": o["watch"],
            "validation_download_bytes": o["validation"]["bytes_out"],
            "validation_requests": o["validation"]["requests"],
            "publish_requests_by_kind": kinds(o["publish_log"][:start] + o["publish_log"][end:], site),
            "promotion_requests_by_kind": kinds(o["publish_log"][start:end], site),
        },
        "seed": {
            "uploaded_bytes": s["upload"]["bytes_in"] + s["rename"]["bytes_in"],
            "upload_ratio": (s["upload"]["bytes_in"] + s["rename"]["bytes_in"]) / size,
            "server_side_copied": s["rename"]["bytes_copied"],
            "server_data_written": s["rename"]["disk_bytes"],
            "requests_per_publish": s["upload"]["requests"] + s["rename"]["requests"],
            "requests_upload": s["upload"]["requests"], "requests_rename": s["rename"]["requests"],
            "promotion_seconds": med([r["rename"]["seconds"] for r in seed]),
            "upload_seconds": med([r["upload"]["seconds"] for r in seed]),
            "incomplete_seconds": med([r["watch"]["incomplete_seconds"] for r in seed]),
            "incomplete_marked_seconds": med([r["watch"]["incomplete_marked_seconds"] for r in seed]),
            "watch": s["watch"],
            "rename_requests_by_kind": kinds(s["log"], site),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("s3", "azure", "all"), default="all", help="which server (default all)")
    parser.add_argument("--mb", type=float, default=100, help="variable size in MiB (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="publishes per way and store (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: --mb 5 --rounds 1")
    parser.add_argument("--write", metavar="RESULTS_MD", help="write the figures into this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.rounds = 5, 1
    if args.write and args.store != "all":
        parser.error("--write replaces the whole section, both stores: run it with --store all")

    tmp = tempfile.mkdtemp(prefix="bench-store-")
    try:
        inputs = build_inputs(tmp, args.mb)
        stores = {}
        for key in (("s3", "azure") if args.store == "all" else (args.store,)):
            with SITES[key]() as site:
                stores[key] = measure(site, inputs, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    figures = {"savedmodel_bytes": inputs["size"], "files": inputs["files"], "work_bytes": inputs["work_size"],
               "rounds": args.rounds, "stores": stores}
    text = render(figures)
    print(text)
    print(json.dumps(figures, indent=1), file=sys.stderr)
    if args.write:
        write_section(args.write, text, HEADING)
    return 0


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def table(f: dict) -> list[str]:
    o, s = f["ours"], f["seed"]
    rows = [
        ("bytes uploaded per publish / SavedModel size", f"{o['upload_ratio']:.4f}", f"{s['upload_ratio']:.4f}"),
        ("bytes copied server-side during promotion (sizes of the objects copied)", mib(o["server_side_copied"]),
         mib(s["server_side_copied"])),
        ("growth of the server's blob data files during promotion (measured)", mib(o["server_data_written"]),
         mib(s["server_data_written"])),
        ("requests per publish (upload + publish)", f"{o['requests_per_publish']} "
         f"({o['requests_upload']} + {o['requests_publish']})",
         f"{s['requests_per_publish']} ({s['requests_upload']} + {s['requests_rename']})"),
        ("requests of the promotion itself", str(o["requests_promotion"]), str(s["requests_rename"])),
        ("promotion time (median)", ms(o["promotion_seconds"]), ms(s["promotion_seconds"])),
        ("time a version directory is listed while not whole (watcher, median)", ms(o["incomplete_seconds"]),
         ms(s["incomplete_seconds"])),
        ("of which with saved_model.pb (TF Serving would try to load it)", ms(o["incomplete_marked_seconds"]),
         ms(s["incomplete_marked_seconds"])),
        ("bytes downloaded to validate staging", mib(o["validation_download_bytes"]), "none (no validation)"),
    ]
    return [
        f"| per publish | this pipeline (`{o['strategy']}`) | seed: upload `temp-<ts>`, then `fs.copy` + `fs.rm` "
        "per object in name order |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    ]


def first_round(stores: dict, rounds: int) -> str:
    what = ("the storage check of the export base (`_exports/storage-check.json`, once per process and base) "
            "and, on S3, the create-only probe (once per process and bucket)")
    if rounds == 1:
        return f"- With one round, the figures include what only the first publish of a process does: {what}."
    extra = ", ".join(f"{NAMES[k]} {v['first_round_extra_requests']}" for k, v in stores.items())
    return (f"- The first publish of the process also made {what}: requests more than in the last round "
            f"({extra}).")


def render(f: dict) -> str:
    stores = f["stores"]
    lines = [
        HEADING,
        "",
        f"`bench/store_publish.py`: a SavedModel of {mib(f['savedmodel_bytes'])} ({f['files']} files, one float32 "
        f"variable) published {times(f['rounds'])} each way to "
        + " and to ".join(f"{NAMES[k]} ({v['title']})" for k, v in stores.items())
        + ", each on loopback with its data on local disk, through a counting proxy. Bytes and requests are "
        "those of the last round; times are medians. The seed renames through the fsspec filesystem the "
        "pipeline opens (s3fs, adlfs).",
    ]
    for key, fig in stores.items():
        lines += ["", f"### {NAMES[key]} ({fig['title']})", "", *table(fig)]
    lines += [
        "",
        f"- Uploaded bytes include the request framing, the claim, the manifest, the ledger entry and the "
        f"validation inputs ({f['work_bytes'] / 1024:.0f} KiB): the SavedModel itself goes over the wire once "
        "either way.",
        first_round(stores, f["rounds"]),
        "- Bytes copied server-side are derived (the proxy sees copy requests, not what the server does): the "
        "sizes of the objects copied. The growth of the server's blob data files (SeaweedFS's volume `.dat` "
        "files, Azurite's extents) is measured on its disk around the promotion.",
        "- The watcher lists the base as TF Serving does (integer-named children), then each one's files, "
        "back to back on its own connection (not counted); a listing that finds a version not whole counts "
        "the time to the next one. Neither way makes a version appear at once: an object store has no "
        "directory rename. This pipeline copies `saved_model.pb` last, so until the version is whole TF "
        "Serving sees a directory it cannot load (no `saved_model.pb`), never one it loads with files "
        "missing; the seed copies in name order, and `saved_model.pb` sorts before `variables/`.",
        "- Most of the seed's promotion requests are fsspec's look-ups before each copy: s3fs's `copy` lists "
        "the source and the destination as possible directories and HEADs the source before its CopyObject, "
        "and `rm` is a DeleteObjects; adlfs's `copy` lists the destination and sends five HEADs before its "
        "Copy Blob, and `rm` is a Delete Blob.",
        "",
        "What the emulators lack, and what it means on the real services:",
        "",
        "- SeaweedFS copies the bytes on CopyObject (each chunk read from its volume and written again: its "
        "data files grow by the object's size), as S3 does server-side; it is slower here than a reference "
        "would be, and on AWS each CopyObject (up to 5 GiB in one request) and each delete is a request billed "
        "per object. It enforces `If-None-Match: *` on PutObject and CopyObject, `x-amz-copy-source-if-match` "
        "and `If-Match` on DeleteObject, as AWS does; it answers 412 to a conditional delete of a missing key "
        "(AWS: 404), which the store checks with a HEAD.",
        "- SeaweedFS keeps a folder emptied by deletes listed as a prefix until its `key/` is deleted, so the "
        "store deletes each emptied folder of staging by its `key/` name after the sources, one at a time "
        "(three requests per publish here: staging, `assets.extra/`, `variables/`): on AWS they change "
        "nothing.",
        "- Azurite's Copy Blob makes the destination refer to the source's stored bytes (its extents do not "
        "grow) and answers `success` at once, so the store never polls a pending copy. On Azure a Copy Blob "
        "within one account may answer `pending`; the store then polls Get Blob Properties (from 50 ms, "
        "doubling up to 2 s), requests that do not appear here.",
        "- Azurite enforces the conditions on Copy Blob (destination `If-None-Match: *`, source ETag) and on "
        "Delete Blob (`If-Match`), but names a failed source condition `ConditionNotMet` where Azure says "
        "`SourceConditionNotMet`; the store tells the two apart by reading the destination.",
        "- Both run on loopback and local disk, so the times are lower bounds: on the real services each "
        "request costs a round trip of tens of milliseconds, which weighs on the seed's sequential "
        "copy+delete per object (with s3fs's and adlfs's look-ups before each) more than on one concurrent "
        "round of copies.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
