"""Serving control: TF Serving's model config file, labels, promotion, rollback and history.

Every file the pipeline writes is read back with TF Serving's own protos
(``model_server_config_pb2`` + ``text_format``), never through pipeline code.
On local disk a ``sitecustomize`` loaded by the CLI's processes copies each
file at the moment it is renamed into place, so the tests see every version of
the file, not only the last one; on GCS the bucket keeps every generation.

The label rule (TF Serving lets a label point only at a version it has
loaded) is checked on each written file against the file before it: no label
may point at a version the previous file did not list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Workspace, cli_env, make_workspace, one_line_error
from tests.support.gcs_fixtures import GcsBucket, gcs_bucket, gcs_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)

MODEL = "demo"
CONFIG_REL = "tfs/models.config"
SERVING = {"model_name": MODEL, "model_config_file": f"./{CONFIG_REL}", "policy": "labels", "reload_seconds": 0}


# -- reading files with TF Serving's protos ------------------------------------------------
def parse(data: bytes):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(data.decode("utf-8"), config)
    return config


def entry(config, name: str = MODEL):
    found = [e for e in config.model_config_list.config if e.name == name]
    assert len(found) <= 1, f"{len(found)} entries named {name}"
    return found[0] if found else None


def state(data: bytes | None, name: str = MODEL) -> tuple[list[int], dict[str, int]]:
    """(listed versions, labels) of ``name``'s entry in a file's bytes (None: no file)."""
    e = entry(parse(data), name) if data is not None else None
    if e is None:
        return [], {}
    listed = sorted(e.model_version_policy.specific.versions) \
        if e.model_version_policy.WhichOneof("policy_choice") == "specific" else []
    return listed, dict(e.version_labels)


def assert_label_rule(files: list[bytes], before: bytes | None = None, name: str = MODEL) -> None:
    """No written file has a label pointing at a version the previous file did not list."""
    prev_listed, _ = state(before, name)
    for i, data in enumerate(files):
        listed, labels = state(data, name)
        bad = {k: v for k, v in labels.items() if v not in prev_listed}
        assert not bad, f"file #{i} labels {bad}, not listed by the file before it ({prev_listed}):\n{data.decode()}"
        assert set(labels.values()) <= set(listed), f"file #{i} labels a version it does not list"
        prev_listed = listed


def assert_history_chain(records: list[dict], start: tuple[list[int], dict] = ([], {})) -> None:
    """Each record starts where the one before it ended: no write is missing or lost."""
    prev = start
    for i, r in enumerate(records):
        assert (r["versions_before"], r["labels_before"]) == (list(prev[0]), dict(prev[1])), \
            f"history record #{i} ({r['command']} {r['phase']}) does not start where #{i - 1} ended"
        assert r["written"] is True
        assert set(r["labels_after"].values()) <= set(r["versions_before"]), f"record #{i} breaks the label rule"
        prev = (r["versions_after"], r["labels_after"])


# -- every file written on local disk, captured as it is renamed into place -------------------
CAPTURE_SITE = '''
import os
_dir, _target = os.environ.get("TF_TEST_CAPTURE_DIR"), os.environ.get("TF_TEST_CAPTURE_FILE")
if _dir and _target:
    import time
    _real_replace = os.replace

    def _capturing_replace(src, dst, *args, **kwargs):
        if os.path.realpath(dst) != os.path.realpath(_target):
            return _real_replace(src, dst, *args, **kwargs)
        with open(src, "rb") as fh:
            data = fh.read()
        out = _real_replace(src, dst, *args, **kwargs)
        # still under the writer's lock: the names sort in the order the files were written
        with open(os.path.join(_dir, "%020d-%d" % (time.time_ns(), os.getpid())), "wb") as fh:
            fh.write(data)
        return out

    os.replace = _capturing_replace
'''


class Capture:
    """Runs the CLI with a sitecustomize that keeps a copy of every version of the model config file."""

    def __init__(self, root: Path, target: Path):
        self.site = root / "capture_site"
        self.dir = root / "captured"
        self.site.mkdir(exist_ok=True)
        self.dir.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(CAPTURE_SITE)
        self.target = target

    @property
    def env(self) -> dict:
        return {"PYTHONPATH": os.pathsep.join([str(self.site), str(REPO)]),
                "TF_TEST_CAPTURE_DIR": str(self.dir), "TF_TEST_CAPTURE_FILE": str(self.target)}

    def files(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir())]


# -- workspaces --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory, trained_dir) -> Workspace:
    """ckpt-10 and ckpt-20 published as versions 10 and 20 (no serving section); ckpt-30 left."""
    ws = make_workspace(tmp_path_factory.mktemp("published"), trained_dir, versioning="step")
    for name in ("ckpt-10", "ckpt-20"):
        res = ws.cli("run", "--checkpoint", name, "--json")
        assert res.rc == 0 and res.json["status"] == "published", res.err
    assert ws.versions() == [10, 20]
    return ws


def copy_of(published: Workspace, tmp_path: Path, **overrides) -> Workspace:
    """A copy of the published workspace with its config rewritten (paths in it are relative)."""
    from tf_export_pipeline.demo import write_config

    root = tmp_path / "ws"
    shutil.copytree(published.root, root)
    config = Path(write_config(str(root), versioning="step", **overrides))
    return Workspace(root, root / "train", root / "serving" / "demo_regressor", config)


def model_config(ws: Workspace) -> Path:
    return ws.root / CONFIG_REL


def fake_version(base: Path, version: int, like: int | None = None) -> None:
    """A whole version: a copy of a published one, or the two files promotion checks."""
    if like is not None:
        shutil.copytree(base / str(like), base / str(version))
        return
    (base / str(version) / "assets.extra").mkdir(parents=True)
    (base / str(version) / "saved_model.pb").write_bytes(b"\x08\x01")
    (base / str(version) / "assets.extra" / "export_manifest.json").write_text(
        json.dumps({"version": version, "checkpoint": {"path": f"ckpt-{version}", "step": version}}))


# -- 1. end to end on local disk ------------------------------------------------------------
def test_publish_promote_rollback_history_end_to_end(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving=SERVING)
    target = model_config(ws)
    cap = Capture(tmp_path, target)

    first = ws.cli("run", "--checkpoint", "ckpt-20", "--json", env=cap.env)
    assert first.rc == 0, first.err
    assert first.json["status"] == "published" and first.json["version"] == 20
    assert first.json["labels"] == {"stable": 20, "canary": 20}
    assert state(target.read_bytes()) == ([20], {"stable": 20, "canary": 20})

    second = ws.cli("run", "--json", env=cap.env)
    assert second.rc == 0, second.err
    assert second.json["version"] == 30 and second.json["labels"] == {"stable": 20, "canary": 30}
    assert "serving_error" not in second.json

    e = entry(parse(target.read_bytes()))
    assert e.base_path == str(ws.base) and e.model_platform == "tensorflow"

    shown = ws.cli("labels", "--json", env=cap.env)
    assert shown.rc == 0, shown.err
    view = shown.json
    assert view["model"] == MODEL and view["policy"] == "labels" and view["file"] == str(target)
    assert view["versions"] == [20, 30] and view["labels"] == {"stable": 20, "canary": 30}
    assert view["sources"]["20"]["step"] == 20 and view["sources"]["30"]["step"] == 30
    assert view["sources"]["30"]["checkpoint"].endswith("ckpt-30") and view["sources"]["30"]["exists"]
    assert view["rollback_to"] is None
    human = ws.cli("labels", env=cap.env)
    assert human.rc == 0 and "stable" in human.out and "rollback goes to: nothing earlier" in human.out

    promoted = ws.cli("promote", "30", "--json", env=cap.env)  # reload_seconds 0: no wait
    assert promoted.rc == 0, promoted.err
    assert promoted.json["labels_after"] == {"stable": 30, "canary": 30}
    assert state(target.read_bytes()) == ([30], {"stable": 30, "canary": 30})
    assert ws.cli("labels", "--json").json["rollback_to"] == 20

    rolled = ws.cli("rollback", "--now", "--json", env=cap.env)
    assert rolled.rc == 0, rolled.err
    assert rolled.json["command"] == "rollback" and rolled.json["labels_after"] == {"stable": 20, "canary": 30}
    assert state(target.read_bytes()) == ([20, 30], {"stable": 20, "canary": 30})
    assert ws.cli("labels", "--json").json["rollback_to"] is None  # nothing stable before 20

    hist = ws.cli("history", "--json")
    assert hist.rc == 0, hist.err
    records = hist.json
    assert [(r["command"], r["phase"], r["versions_after"], r["labels_after"]) for r in records] == [
        ("publish", "list", [20], {}),
        ("publish", "labels", [20], {"canary": 20, "stable": 20}),
        ("publish", "list", [20, 30], {"canary": 20, "stable": 20}),
        ("publish", "labels", [20, 30], {"canary": 30, "stable": 20}),
        ("promote", "labels", [30], {"canary": 30, "stable": 30}),
        ("rollback", "list", [20, 30], {"canary": 30, "stable": 30}),
        ("rollback", "labels", [20, 30], {"canary": 30, "stable": 20}),
    ]
    assert_history_chain(records)
    assert all(r["model"] == MODEL and r["file"] == str(target) and r["at"] > 0 for r in records)
    human = ws.cli("history")
    assert human.rc == 0 and len(human.out.strip().splitlines()) == len(records)
    assert "stable: 30 -> 20" in human.out.strip().splitlines()[-1]

    # every file the pipeline wrote: parsed with TF Serving's protos, one per history record, label rule kept
    files = cap.files()
    assert len(files) == len(records)
    assert [state(f) for f in files] == [(r["versions_after"], r["labels_after"]) for r in records]
    assert_label_rule(files)
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


# -- 2. promoting what is not a whole version -------------------------------------------
def test_promote_refuses_missing_or_partial_versions(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING)
    assert ws.cli("promote", "10", "--now").rc == 0
    before = model_config(ws).read_bytes()

    (ws.base / "30").mkdir()                                   # an integer directory, nothing in it
    shutil.copytree(ws.base / "20", ws.base / "40")            # a copy that lost its saved_model.pb
    (ws.base / "40" / "saved_model.pb").unlink()
    shutil.copytree(ws.base / "20", ws.base / "50")            # and one that lost its manifest
    (ws.base / "50" / "assets.extra" / "export_manifest.json").unlink()
    for version in ("12345", "30", "40", "50"):
        res = ws.cli("promote", version, "--now")
        assert res.rc == 2, res.err
        line = one_line_error(res)
        assert f"version {version} does not exist or is not whole" in line and str(ws.base / version) in line
        assert model_config(ws).read_bytes() == before
    res = ws.cli("rollback", "--to", "40", "--now")
    assert res.rc == 2 and "version 40 does not exist or is not whole" in one_line_error(res)
    res = ws.cli("promote", "20", "--label", "not-a-label", "--now")
    assert res.rc == 2 and "a label is letters, digits and _ only" in one_line_error(res)
    res = ws.cli("rollback", "--now")  # only one stable so far
    assert res.rc == 2 and "no earlier stable version" in one_line_error(res)
    assert model_config(ws).read_bytes() == before
    assert [r["command"] for r in ws.cli("history", "--json").json] == ["promote", "promote"]


def test_serving_commands_without_a_serving_section(tmp_path, published):
    ws = copy_of(published, tmp_path)
    for args in (("labels",), ("promote", "20", "--now"), ("rollback", "--now"), ("history",)):
        res = ws.cli(*args)
        assert res.rc == 2, (args, res.err)
        assert "the config has no serving: section" in one_line_error(res)
    assert not (ws.root / "tfs").exists()


# -- 3. other models' entries, and a file that does not parse -----------------------------
HAND_WRITTEN = """\
# Written by hand: two other models share this file with the pipeline's.
model_config_list {
  config {
    name: "search"
    base_path: "/models/search"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 7 versions: 9 } }
    version_labels { key: "prod" value: 7 }
    version_labels { key: "next" value: 9 }
    logging_config {
      log_collector_config { type: "file" filename_prefix: "/logs/search" }
      sampling_config { sampling_rate: 0.05 }
    }
  }
  config {
    name: "demo"  # the pipeline's model, with a logging config of its own
    base_path: "EXPORT_BASE"
    model_platform: "tensorflow"
    logging_config { sampling_config { sampling_rate: 0.5 } }
  }
  config {
    name: "embedder"
    base_path: "gs://other-bucket/embedder"
    model_platform: "tensorflow"
    model_version_policy { all {} }
  }
}
"""


def _others(data: bytes) -> list:
    return [e for e in parse(data).model_config_list.config if e.name != MODEL]


def test_other_models_survive_every_command(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING, retention={"keep": 1})
    target = model_config(ws)
    target.parent.mkdir()
    target.write_text(HAND_WRITTEN.replace("EXPORT_BASE", str(ws.base)))  # an entry serves one export base
    original = _others(target.read_bytes())
    assert [e.name for e in original] == ["search", "embedder"]
    cap = Capture(tmp_path, target)

    steps = [("labels",), ("promote", "10"), ("promote", "20", "--label", "canary"), ("promote", "20"),
             ("rollback",), ("history",), ("gc",), ("run",)]
    for args in steps:
        res = ws.cli(*args, "--json", env=cap.env)
        assert res.rc == 0, (args, res.err)
        data = target.read_bytes()
        assert _others(data) == original, f"after {args}"
        assert [e.name for e in parse(data).model_config_list.config] == ["search", MODEL, "embedder"]
        ours = entry(parse(data))
        assert ours.logging_config.sampling_config.sampling_rate == 0.5, f"after {args}"
    assert state(target.read_bytes()) == ([10, 30], {"stable": 10, "canary": 30})
    assert entry(parse(target.read_bytes())).base_path == str(ws.base)
    for data in cap.files():
        assert _others(data) == original
    assert_label_rule(cap.files(), before=HAND_WRITTEN.encode())
    # the run's retention (keep 1) removed 20: no label, list or rollback names it any more
    assert ws.versions() == [10, 30]


@pytest.mark.parametrize("broken", [b'model_config_list {\n  config { name: "search" base_path: "/m"\n',
                                    b"model_config_list { config { nme: 'x' } }\n",
                                    b"\xff\xfe\x00garbage\x00"])
def test_file_that_does_not_parse_is_reported_and_left_alone(tmp_path, published, broken):
    ws = copy_of(published, tmp_path, serving=SERVING, retention={"keep": 1})
    target = model_config(ws)
    target.parent.mkdir()
    target.write_bytes(broken)
    mtime = target.stat().st_mtime_ns
    for args in (("labels",), ("promote", "20", "--now"), ("rollback", "--to", "10", "--now"), ("gc",)):
        res = ws.cli(*args)
        assert res.rc == 2, (args, res.err)
        line = one_line_error(res)
        assert "model config file does not parse" in line and str(target) in line, line
        assert target.read_bytes() == broken and target.stat().st_mtime_ns == mtime
    assert ws.versions() == [10, 20]  # gc removed nothing it could not check
    assert not [p.name for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_publish_whose_label_cannot_be_written_reports_it(tmp_path, published, forked_validation):
    """The version is published whatever happens to its label: the error is in the record, not raised."""
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.records import public
    from tf_export_pipeline.stages import export_and_validate, stage_publish

    ws = copy_of(published, tmp_path, serving=SERVING)
    cfg = load_config(str(ws.config))
    validated = export_and_validate(cfg)
    assert validated.status == "validated", validated
    model_config(ws).parent.mkdir()
    model_config(ws).write_text("model_config_list { config { name: 'x' ")  # broken after validation
    record = stage_publish(cfg, validated)
    assert record.status == "published" and record.version == 30
    assert record.serving_error and "model config file does not parse" in record.serving_error
    assert public(record)["serving_error"] == record.serving_error  # what `run --json` prints
    assert ws.versions() == [10, 20, 30]


# -- 4. retention keeps what the file names -----------------------------------------------------
def test_retention_keeps_labelled_listed_and_rollback_versions(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING, retention={"keep": 1})
    for version in (5, 35, 40):
        fake_version(ws.base, version, like=20)
    assert ws.cli("promote", "10", "--now").rc == 0
    assert ws.cli("promote", "20", "--now").rc == 0            # stable 20; rollback goes to 10
    assert ws.cli("promote", "5", "--label", "canary", "--now").rc == 0
    # a promotion between its two writes: 35 listed, not yet labelled
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl

    control = ServingControl.from_config(load_config(str(ws.config)))
    control._write(lambda s: (sorted(set(s.listed) | {35}), s.labels), "promote", phase="list")
    view = ws.cli("labels", "--json").json
    assert view["versions"] == [5, 20, 35] and view["labels"] == {"stable": 20, "canary": 5}
    assert view["rollback_to"] == 10
    before = model_config(ws).read_bytes()

    dry = ws.cli("gc", "--dry-run", "--json")
    assert dry.rc == 0, dry.err
    assert dry.json["removed_versions"] == []
    fake_version(ws.base, 30, like=20)  # one more, named by nothing and not the newest: retention's
    gc = ws.cli("gc", "--json")
    assert gc.rc == 0, gc.err
    assert gc.json["removed_versions"] == [30]
    assert ws.versions() == [5, 10, 20, 35, 40]  # canary, rollback target, stable, listed, newest
    assert model_config(ws).read_bytes() == before

    assert ws.cli("rollback", "--now").rc == 0  # and the rollback target is still there to go back to
    assert state(model_config(ws).read_bytes())[1] == {"stable": 10, "canary": 5}


# -- 5. two promotions racing ----------------------------------------------------------------
RACER = textwrap.dedent('''
    import json, sys, time
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ConcurrentChange, ModelConfigFile, ServingControl

    conflicts = 0
    write = ModelConfigFile.write

    def counting_write(self, config, token):
        global conflicts
        try:
            return write(self, config, token)
        except ConcurrentChange:
            conflicts += 1  # the other racer wrote first: a conditional write refused (GCS)
            raise

    ModelConfigFile.write = counting_write

    config, label, versions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rounds, start = int(sys.argv[4]), float(sys.argv[5])
    control = ServingControl.from_config(load_config(config))
    done = []
    while time.time() < start:
        time.sleep(0.001)
    for i in range(rounds):
        v = versions[i % len(versions)]
        rec = control.promote(v, label=label, now=True)
        assert rec["labels_after"][label] == v, rec
        done.append(v)
    print(json.dumps({"done": done, "conflicts": conflicts}))
''')


def _race(root: Path, config: Path, rounds: int, env: dict | None = None) -> tuple[dict[str, list[int]], int]:
    """Two processes promoting at once, one moving stable and one canary, over overlapping versions."""
    script = root / "racer.py"
    script.write_text(RACER)
    start = time.time() + 3.0  # both have imported everything by then
    plan = {"stable": [1, 2, 3, 4], "canary": [4, 5, 6, 1]}
    procs = {label: subprocess.Popen([sys.executable, str(script), str(config), label, json.dumps(vs),
                                      str(rounds), str(start)], env=cli_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for label, vs in plan.items()}
    done, conflicts = {}, 0
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{label} racer failed:\n{err[-3000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        done[label], conflicts = result["done"], conflicts + result["conflicts"]
        assert len(done[label]) == rounds
    return done, conflicts


def _check_race(done: dict[str, list[int]], final: bytes, records: list[dict], files: list[bytes]) -> None:
    listed, labels = state(final)
    assert labels == {"stable": done["stable"][-1], "canary": done["canary"][-1]}, "an update was lost"
    assert listed == sorted(set(labels.values()))
    assert_history_chain(records)
    assert (records[-1]["versions_after"], records[-1]["labels_after"]) == (listed, labels)
    moves = [r for r in records if r["phase"] == "labels"]
    # each promotion moved its label once (a promotion to where the label already is writes nothing)
    for label, versions in done.items():
        changes = [r["labels_after"][label] for r in moves
                   if label in r["labels_after"] and r["labels_before"].get(label) != r["labels_after"][label]]
        expected = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        assert changes == expected, f"{label}: moved {changes}, promoted {expected}"
    assert len(files) == len(records), "a write without its history record, or a record without its write"
    assert [state(f) for f in files] == [(r["versions_after"], r["labels_after"]) for r in records]
    assert_label_rule(files)


def test_two_promotions_racing_lose_no_update_on_local_disk(tmp_path):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import write_config
    from tf_export_pipeline.serving import ServingControl

    config = Path(write_config(str(tmp_path), serving=SERVING))
    base = tmp_path / "serving" / "demo_regressor"
    for v in range(1, 7):
        fake_version(base, v)
    cap = Capture(tmp_path, tmp_path / CONFIG_REL)
    done, conflicts = _race(tmp_path, config, rounds=40, env=cap.env)
    assert conflicts == 0  # on local disk the lock serialises read-modify-write: nothing to refuse
    control = ServingControl.from_config(load_config(str(config)))
    _check_race(done, (tmp_path / CONFIG_REL).read_bytes(), control.history(), cap.files())


BASE = "serving/demo_regressor"


def _gcs_config(root: Path, bucket: GcsBucket, **serving) -> Path:
    from tf_export_pipeline.demo import write_config

    return Path(write_config(str(root), training_dir=bucket.url("train"), export_base=bucket.url(BASE),
                             storage_options=bucket.storage_options,
                             serving={**SERVING, "model_config_file": bucket.url(CONFIG_REL), **serving}))


def _gcs_fake_version(bucket: GcsBucket, version: int) -> None:
    fs = bucket.fs()
    fs.pipe_file(bucket.path(BASE, str(version), "assets.extra/export_manifest.json"),
                 json.dumps({"version": version, "checkpoint": {"path": f"ckpt-{version}", "step": version}}).encode())
    fs.pipe_file(bucket.path(BASE, str(version), "saved_model.pb"), b"\x08\x01")


def _gcs_generations(bucket: GcsBucket, rel: str) -> list[bytes]:
    """Every generation of an object, oldest first (the bucket keeps them: versioning is on)."""
    import urllib.parse
    import urllib.request

    server = bucket.server
    q = urllib.parse.urlencode({"prefix": rel, "versions": "true"})
    status, page = server.request("GET", f"/storage/v1/b/{bucket.name}/o?{q}")
    assert status == 200, page
    gens = sorted(int(o["generation"]) for o in page.get("items", []) if o["name"] == rel)
    out = []
    for g in gens:
        url = f"{server.url}/download/storage/v1/b/{bucket.name}/o/{urllib.parse.quote(rel, safe='')}" \
              f"?alt=media&generation={g}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            out.append(resp.read())
    return out


@pytest.fixture
def versioned_bucket(gcs_server):
    """A fresh bucket that keeps every generation of its objects."""
    from tests.support.gcs_emulator import clear_gcsfs_caches, ensure_plain_gcsfs, storage_options

    ensure_plain_gcsfs()
    clear_gcsfs_caches()
    name = gcs_server.create_bucket(versioning={"enabled": True})
    yield GcsBucket(name, storage_options(gcs_server.url), gcs_server)
    clear_gcsfs_caches()
    try:
        gcs_server.delete_bucket(name)
    except Exception:
        pass  # the emulator is in memory and per session: nothing leaks


def test_two_promotions_racing_lose_no_update_on_gcs(tmp_path, versioned_bucket):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl

    bucket = versioned_bucket
    config = _gcs_config(tmp_path, bucket)
    for v in range(1, 7):
        _gcs_fake_version(bucket, v)
    done, conflicts = _race(tmp_path, config, rounds=15)
    print(f"conditional uploads refused: {conflicts}")
    control = ServingControl.from_config(load_config(str(config)))
    final = bucket.fs().cat_file(bucket.path(CONFIG_REL))
    _check_race(done, final, control.history(), _gcs_generations(bucket, CONFIG_REL))


def test_conditional_upload_refuses_a_stale_write_on_gcs(tmp_path, gcs_bucket):
    """What protects the race on GCS: a write based on an older read is refused, not applied."""
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ConcurrentChange, ModelConfigFile, ServingControl, entry_of

    config = _gcs_config(tmp_path, gcs_bucket)
    _gcs_fake_version(gcs_bucket, 1)
    control = ServingControl.from_config(load_config(str(config)))
    control.promote(1, now=True)
    file = ModelConfigFile(gcs_bucket.url(CONFIG_REL), gcs_bucket.storage_options)
    stale, token = file.read()
    fresh, fresh_token = file.read()
    entry_of(fresh, MODEL).version_labels["canary"] = 1
    file.write(fresh, fresh_token)
    entry_of(stale, MODEL).version_labels["other"] = 1
    with pytest.raises(ConcurrentChange):
        file.write(stale, token)
    assert state(gcs_bucket.fs().cat_file(gcs_bucket.path(CONFIG_REL)))[1] == {"stable": 1, "canary": 1}


# -- 6. promote, rollback, history end to end on GCS ---------------------------------------------
def test_promote_rollback_history_on_gcs(tmp_path, trained_dir, versioned_bucket):
    from tests.test_gcs_end_to_end import SECRET, make_gcs_workspace

    bucket = versioned_bucket
    ws = make_gcs_workspace(tmp_path, trained_dir, bucket, versioning="step",
                            serving={**SERVING, "model_config_file": bucket.url(CONFIG_REL)})

    def current() -> bytes:
        return bucket.fs().cat_file(bucket.path(CONFIG_REL))

    first = ws.cli("run", "--checkpoint", "ckpt-20", "--json")
    assert first.rc == 0, first.err
    assert first.json["version"] == 20 and first.json["labels"] == {"stable": 20, "canary": 20}
    second = ws.cli("run", "--json")
    assert second.rc == 0, second.err
    assert second.json["version"] == 30 and second.json["labels"] == {"stable": 20, "canary": 30}
    assert entry(parse(current())).base_path == bucket.url(BASE)

    view = ws.cli("labels", "--json")
    assert view.rc == 0, view.err
    assert view.json["file"] == bucket.url(CONFIG_REL)
    assert view.json["labels"] == {"stable": 20, "canary": 30} and view.json["versions"] == [20, 30]
    assert view.json["sources"]["30"]["exists"] is True

    refused = ws.cli("promote", "25", "--now")
    assert refused.rc == 2 and "version 25 does not exist or is not whole" in one_line_error(refused)
    promoted = ws.cli("promote", "30", "--now", "--json")
    assert promoted.rc == 0, promoted.err
    assert state(current()) == ([30], {"stable": 30, "canary": 30})
    assert ws.cli("labels", "--json").json["rollback_to"] == 20
    rolled = ws.cli("rollback", "--now", "--json")
    assert rolled.rc == 0, rolled.err
    assert state(current()) == ([20, 30], {"stable": 20, "canary": 30})

    records = ws.cli("history", "--json").json
    assert [(r["command"], r["phase"]) for r in records] == [
        ("publish", "list"), ("publish", "labels"), ("publish", "list"), ("publish", "labels"),
        ("promote", "labels"), ("rollback", "list"), ("rollback", "labels")]
    assert_history_chain(records)
    assert all(r.get("generation") for r in records)
    files = _gcs_generations(bucket, CONFIG_REL)
    assert [state(f) for f in files] == [(r["versions_after"], r["labels_after"]) for r in records]
    assert_label_rule(files)
    history_objects = bucket.server.list_objects(bucket.name, BASE + "/_exports/serving/history/")
    assert len(history_objects) == len(records)
    # each record rides in its object's metadata too: the history is read from listings alone
    assert sorted(json.loads(o["metadata"]["tf-export-record"])["id"] for o in history_objects) == \
        sorted(r["id"] for r in records)
    for res in ws.results:
        assert SECRET not in res.out + res.err


# -- 7. policy: latest ------------------------------------------------------------------------
def test_latest_policy_writes_its_entry_once_and_refuses_labels(tmp_path, published):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl

    ws = copy_of(published, tmp_path, serving={**SERVING, "policy": "latest"})
    target = model_config(ws)
    cap = Capture(tmp_path, target)
    res = ws.cli("run", "--json", env=cap.env)
    assert res.rc == 0, res.err
    assert res.json["version"] == 30 and "serving_error" not in res.json
    e = entry(parse(target.read_bytes()))
    assert e.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert e.model_version_policy.latest.num_versions == 1
    assert not e.version_labels and e.base_path == str(ws.base)
    assert len(cap.files()) == 1
    written = target.read_bytes()

    control = ServingControl.from_config(load_config(str(ws.config)))
    assert control.on_publish(31) is None  # the entry exists: left alone
    assert target.read_bytes() == written
    # labels a person put there under latest are left alone too
    hand = written.decode().replace('model_platform: "tensorflow"',
                                    'model_platform: "tensorflow"\n    version_labels { key: "stable" value: 20 }')
    target.write_text(hand)
    assert control.on_publish(32) is None and target.read_text() == hand

    for args, word in ((("promote", "30", "--now"), "promote"), (("rollback", "--now"), "rollback"),
                       (("promote", "30", "--label", "canary"), "promote")):
        refused = ws.cli(*args)
        assert refused.rc == 2, (word, refused.err)
        assert "serving.policy is 'latest'" in one_line_error(refused)
        assert target.read_text() == hand
    records = ws.cli("history", "--json").json
    assert [(r["command"], r["phase"]) for r in records] == [("publish", "entry")]
    assert ws.cli("labels", "--json").json["entry_policy"] == "latest"


# -- 8. the gate compares with stable -----------------------------------------------------------
def test_metric_gate_compares_with_stable_not_the_highest(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving=SERVING,
                        gate={"metric": "val_loss", "mode": "min", "source": "train/metrics-{step}.json"})
    for step, loss in {10: 0.30, 20: 0.50, 30: 0.40}.items():
        (ws.train / f"metrics-{step}.json").write_text(json.dumps({"step": step, "metrics": {"val_loss": loss}}))

    assert ws.cli("run", "--checkpoint", "ckpt-10", "--json").json["labels"] == {"stable": 10, "canary": 10}
    canary = ws.cli("run", "--checkpoint", "ckpt-20", "--force", "--json").json  # worse, published as canary
    assert canary["status"] == "published" and canary["labels"] == {"stable": 10, "canary": 20}
    assert ws.versions() == [10, 20]

    # ckpt-30 (0.40) is better than the highest version (20: 0.50) but worse than stable (10: 0.30)
    gated = ws.cli("run", "--json")
    assert gated.rc == 0, gated.err
    assert gated.json["status"] == "gated" and gated.json["step"] == 30
    assert gated.json["live_version"] == 10 and gated.json["live_value"] == 0.30
    assert ws.versions() == [10, 20]

    assert ws.cli("promote", "20", "--now").rc == 0  # stable is now 20 (0.50): ckpt-30 beats it
    passed = ws.cli("run", "--json")
    assert passed.rc == 0, passed.err
    assert passed.json["status"] == "published" and passed.json["version"] == 30
    assert passed.json["labels"] == {"stable": 20, "canary": 30}


# -- the ways a label write could go wrong, one by one ------------------------------------------
def test_lost_answer_to_a_model_config_upload_is_our_write_not_a_rival(tmp_path, gcs_bucket, gcs_fault_proxy,
                                                                         fast_gcs_retries):
    """gcsfs retries an upload whose answer was lost; the retry meets 412 caused by our own write."""
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl

    via = gcs_bucket.via(gcs_fault_proxy)
    config = _gcs_config(tmp_path, via)
    _gcs_fake_version(gcs_bucket, 1)
    control = ServingControl.from_config(load_config(str(config)))
    gcs_fault_proxy.configure(drop_after_rate=1.0, max_faults=1,
                              match=lambda m, p: m == "POST" and p.startswith("/upload/"))
    rec = control.promote(1, now=True)
    assert gcs_fault_proxy.counters.dropped_after == 1  # the first upload: the file listing version 1
    assert rec["labels_after"] == {"stable": 1}
    records = control.history()
    assert [(r["command"], r["phase"]) for r in records] == [("promote", "list"), ("promote", "labels")]
    assert_history_chain(records)
    assert state(gcs_bucket.fs().cat_file(gcs_bucket.path(CONFIG_REL))) == ([1], {"stable": 1})


def test_publish_sets_stable_only_if_none_is_set_when_its_label_is_written(tmp_path, monkeypatch):
    """A promotion made while a publish waits for the server to load its version is not overwritten."""
    import tf_export_pipeline.serving.control as serving
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), serving={**SERVING, "reload_seconds": 1})
    base = tmp_path / "serving" / "demo_regressor"
    for v in (1, 2):
        fake_version(base, v)
    publisher = serving.ServingControl.from_config(load_config(config))
    operator = serving.ServingControl.from_config(load_config(config))
    waits = []

    def sleep(seconds):  # the publish waits for the reload; an operator promotes 1 meanwhile
        waits.append(seconds)
        operator.promote(1, now=True)

    monkeypatch.setattr(serving.time, "sleep", sleep)
    rec = publisher.on_publish(2)
    assert waits == [1.5]  # reload_seconds plus half of it, once: the promotion kept 2 listed
    assert rec["labels_after"] == {"stable": 1, "canary": 2}
    assert state((tmp_path / CONFIG_REL).read_bytes()) == ([1, 2], {"stable": 1, "canary": 2})
    records = publisher.history()
    assert [(r["command"], r["phase"], r["versions_after"]) for r in records] == [
        ("publish", "list", [2]), ("promote", "list", [1, 2]), ("promote", "labels", [1, 2]),
        ("publish", "labels", [1, 2])]
    assert_history_chain(records)


def test_a_version_another_promotion_just_listed_is_kept_until_its_grace_runs_out(tmp_path, monkeypatch):
    """A label write keeps a version listed moments ago for a label not yet moved; an orphan goes later."""
    import tf_export_pipeline.serving.control as serving
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), serving=SERVING)
    for v in (1, 2, 3, 4):
        fake_version(tmp_path / "serving" / "demo_regressor", v)
    control = serving.ServingControl.from_config(load_config(config))
    control.promote(1, now=True)
    # a promotion of 3 that listed it and died before its label write
    control._write(lambda s: (sorted(set(s.listed) | {3}), s.labels), "promote", phase="list")
    control.promote(2, now=True)
    assert control.current().listed == [2, 3] and control.current().labels == {"stable": 2}
    monkeypatch.setattr(serving, "PENDING_GRACE_SECONDS", -5.0)  # as if a minute had passed
    control.promote(4, now=True)
    assert control.current().listed == [4] and control.current().labels == {"stable": 4}
    records = control.history()
    assert_history_chain(records)  # which checks the label rule on every write too
