"""Eight racers from eight hostnames on one S3 bucket and one Azure container, released together.

Six ``run``s (two per checkpoint) and two ``backfill``s of ckpt-10..30, each
command on a host of its own (a UTS namespace per forked command, as
``unshare -u`` gives), all held at the start of their publish and released at
one instant: every command exits 0 with ``published`` or ``skipped``, each
checkpoint has exactly one version, whole, and one ledger entry, the versions
follow the checkpoints (``versioning: step``: the step, or the next free number
after a collision), no claim of a loser and no staging is left, and no
credential is in any output.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.conftest import cli_popen, release_together

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = [10, 20, 30]


def _workspace(store: str, request, tmp_path, trained_dir) -> tuple[str, str, dict, list[str]]:
    """(config, export base URL, storage options, the secrets that must not be printed) on the store named."""
    if store == "s3":
        from tests.test_s3_store import make_s3_workspace

        bucket = request.getfixturevalue("s3_bucket")
        ws = make_s3_workspace(tmp_path, trained_dir, bucket, versioning="step")
        return str(ws.config), ws.base_url, dict(bucket.storage_options), [bucket.storage_options["secret"]]
    from tests.test_azure_store import ACCOUNT_KEY, BASE, upload_tree
    from tf_export_pipeline.demo import write_config

    container = request.getfixturevalue("azure_container")
    upload_tree(container, trained_dir, "train")
    config = write_config(str(tmp_path), training_dir=container.url("train"), export_base=container.url(BASE),
                          storage_options=container.storage_options, versioning="step")
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
