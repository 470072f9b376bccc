"""Eight racers from eight hostnames on one S3 bucket and one Azure container, released together.

Six ``run``s (two per checkpoint) and two ``backfill``s of ckpt-10..30, each
command on a host of its own (a UTS namespace per forked command, as
``unshare -u`` gives), all held at the start of their publish and released at
one instant: every command exits 0 with ``published`` or ``skipped``, each
checkpoint has exactly one version, whole, and one ledger entry, the versions
follow the checkpoints (``versioning: step``: the step, or the next free number
after a collision), no claim of a loser and no staging is left, and no
credential is in any output.

Then gc racing publishes on each store: three ``gc`` started at the instant
three ``run``s and a ``backfill`` of the two newest are released into their publish, with
retention tightened and abandoned staging of an hour ago beside: every command
exits 0, gc takes the abandoned staging and never a racer's, and the export base
ends with the newest checkpoints whole, each once, and removal records for the
rest.

And a version directory that gains an object of other content during its
promotion (a hand, another tool) fails the run in one line naming it; the
object is kept, and no version is counted whole that does not match its
manifest.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.conftest import cli_popen, release_together

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = [10, 20, 30]


def _workspace(store: str, request, tmp_path, trained_dir, **overrides) -> tuple[str, str, dict, list[str]]:
    """(config, export base URL, storage options, the secrets that must not be printed) on the store named."""
    if store == "s3":
        from tests.test_s3_store import make_s3_workspace

        bucket = request.getfixturevalue("s3_bucket")
        ws = make_s3_workspace(tmp_path, trained_dir, bucket, versioning="step", **overrides)
        return str(ws.config), ws.base_url, dict(bucket.storage_options), [bucket.storage_options["secret"]]
    from tests.test_azure_store import ACCOUNT_KEY, BASE, upload_tree
    from tf_export_pipeline.demo import write_config

    container = request.getfixturevalue("azure_container")
    upload_tree(container, trained_dir, "train")
    config = write_config(str(tmp_path), training_dir=container.url("train"), export_base=container.url(BASE),
                          storage_options=container.storage_options, versioning="step", **overrides)
    return config, container.url(BASE), container.storage_options, [ACCOUNT_KEY]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a hostname per racer (unshare -u)")
@pytest.mark.parametrize("store", ["s3", "az"])
def test_eight_racers_from_eight_hosts_publish_each_checkpoint_once_in_order(store, request, tmp_path,
                                                                              trained_dir):
    from tf_export_pipeline.layout import EXPORTS_DIR
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage

    config, base_url, options, secrets = _workspace(store, request, tmp_path, trained_dir)
    release = tmp_path / "release"
    env = {"TF_EXPORT_TEST_HOLD": f"publishing@{release}"}
    commands = [("run", "--checkpoint", f"ckpt-{s}") for s in STEPS for _ in range(2)]
    commands += [("backfill", "--versioning", "step")] * 2
    procs = [cli_popen(*c, "--json", "--config", config, env=env, hostname=f"racer-{i + 1}")
             for i, c in enumerate(commands)]
    outs, errs, held = release_together(procs, release, limit=480)
    for c, p, e in zip(commands, procs, errs):
        assert p.returncode == 0, (c, e)
    assert held == len(procs), "every racer should have reached its publish"

    records = []
    for out in outs:
        got = json.loads(out)
        records += got if isinstance(got, list) else [got]
    assert {r["status"] for r in records} <= {"published", "skipped"}, records
    by_step: dict[int, set] = {}
    for r in records:
        by_step.setdefault(r["step"], set()).add(r["version"])
    # Every racer names the one version of its checkpoint. It is the step, or the next free number when a
    # racer of the same checkpoint held that claim at that instant (README: "on a collision it takes the next
    # number"); versions still follow the steps.
    assert sorted(by_step) == STEPS and all(len(v) == 1 for v in by_step.values()), by_step
    versions = [by_step[s].pop() for s in STEPS]
    assert versions == sorted(set(versions)) and all(v >= s for v, s in zip(versions, STEPS)), versions

    publisher = Publisher(open_storage(base_url, options))
    assert publisher.versions() == versions
    assert all(publisher.is_whole(publisher.version_path(v)) for v in versions)
    steps = Counter((publisher.manifest(v) or {}).get("checkpoint", {}).get("step") for v in versions)
    assert steps == Counter(STEPS), steps  # each checkpoint once
    store_ = publisher.store
    ledger = [e for e in store_.list_dir(store_.join(store_.root, EXPORTS_DIR, "ledger")) if not e.is_dir]
    claims = [e.name for e in store_.list_dir(store_.join(store_.root, EXPORTS_DIR, "claims")) if not e.is_dir]
    assert len(ledger) == len(STEPS) and sorted(claims, key=int) == [str(v) for v in versions], (ledger, claims)
    assert not [e.name for e in store_.list_dir(store_.root) if e.name.startswith("temp-")]  # no staging left
    for text in outs + errs:
        assert not any(secret in text for secret in secrets)


@pytest.mark.parametrize("store", ["s3", "az"])
def test_gc_racing_publishes_takes_only_abandoned_staging(store, request, tmp_path, trained_dir):
    import time

    from tf_export_pipeline.layout import EXPORTS_DIR
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage

    config, base_url, options, secrets = _workspace(store, request, tmp_path, trained_dir,
                                                    retention={"keep": 2, "lease_seconds": 600})
    publisher = Publisher(open_storage(base_url, options))
    store_ = publisher.store
    abandoned = [f"temp-{int(time.time()) - 3600}-dead{i:04x}" for i in range(3)]
    for name in abandoned:  # staging of exports killed an hour ago: past the lease
        store_.write_bytes(store_.join(store_.root, name, "variables", "variables.index"), b"x")
    release = tmp_path / "release"
    env = {"TF_EXPORT_TEST_HOLD": f"publishing@{release}"}
    # The backfill takes the two newest (retention refuses a range wider than it keeps).
    commands = [("run", "--checkpoint", f"ckpt-{s}") for s in STEPS]
    commands += [("backfill", "--versioning", "step", "--from-step", str(STEPS[-2]))]
    racers = [cli_popen(*c, "--json", "--config", config, env=env) for c in commands]

    started_gc: list = []

    def start_gcs():
        started_gc.extend(cli_popen("gc", "--json", "--config", config) for _ in range(3))

    outs, errs, held = release_together(racers, release, limit=480, on_release=start_gcs)
    assert held == len(racers), ("every racer should have reached its publish", errs)
    for c, p, e in zip(commands, racers, errs):
        assert p.returncode == 0, (c, e)
    gc_outs = []
    for p in started_gc:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        gc_outs.append(out)
        errs.append(err)
    records = []
    for out in outs:
        got = json.loads(out)
        records += got if isinstance(got, list) else [got]
    assert {r["status"] for r in records} <= {"published", "skipped"}, records
    taken = {name for out in gc_outs for name in json.loads(out)["removed_staging"]}
    assert taken <= set(abandoned), f"gc took a racer's staging: {taken - set(abandoned)}"

    # One more gc once everything settled: retention applies, nothing abandoned is left.
    last = cli_popen("gc", "--json", "--config", config)
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err
    outs.append(out)
    versions = publisher.versions()
    steps = {v: (publisher.manifest(v) or {}).get("checkpoint", {}).get("step") for v in versions}
    assert sorted(steps.values()) == STEPS[-2:], steps  # the two newest checkpoints, each once
    assert all(publisher.is_whole(publisher.version_path(v)) for v in versions)
    assert [steps[v] for v in sorted(versions)] == STEPS[-2:]
    assert not [e.name for e in store_.list_dir(store_.root) if e.name.startswith("temp-")]  # no staging left
    removed = [e for e in store_.list_dir(store_.join(store_.root, EXPORTS_DIR, "removed")) if not e.is_dir]
    assert len(removed) == 1, [e.name for e in removed]  # the oldest checkpoint, published then retired
    for text in outs + errs:
        assert not any(secret in text for secret in secrets)


@pytest.mark.parametrize("store", ["s3", "az"])
def test_a_version_directory_written_by_something_else_during_promotion_fails_in_one_line(store, request, tmp_path,
                                                                                        trained_dir):
    from tf_export_pipeline.storage import open_storage

    config, base_url, options, secrets = _workspace(store, request, tmp_path, trained_dir)
    store_ = open_storage(base_url, options)
    release = tmp_path / "release"
    proc = cli_popen("run", "--config", config, env={"TF_EXPORT_TEST_HOLD": f"promoting@{release}"})
    line = proc.stderr.readline()
    while line and "holding at promoting" not in line:  # everything copied but saved_model.pb
        line = proc.stderr.readline()
    assert "holding at promoting" in line, proc.communicate(timeout=60)
    [claim] = [e.name for e in store_.list_dir(store_.join(store_.root, "_exports", "claims")) if not e.is_dir]
    foreign = store_.join(store_.root, claim, "saved_model.pb")
    store_.write_bytes(foreign, b"not this model")
    release.touch()
    out, err = proc.communicate(timeout=240)
    lines = [x for x in err.splitlines() if x.strip() and "warning:" not in x]
    assert proc.returncode == 1, err
    assert len(lines) == 1 and "already exists with other content" in lines[0], err
    assert "unexpected" not in err and lines[0].endswith(f"{base_url}/{claim}"), err
    assert store_.read_bytes(foreign) == b"not this model"  # nothing overwritten
    assert not any(secret in out + err for secret in secrets)
