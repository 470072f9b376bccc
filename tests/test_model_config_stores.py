"""The model config file on an object store (gs://, s3://, az://): read, changed and written back only if it
is still the object read (GCS generation, S3/Azure ETag, sent as a condition the server enforces), and under
``serving.policy: newest`` it names only versions that are whole on the store.
"""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

STORES = ["gs", "s3", "az"]


def _store_url(store: str, request) -> tuple[str, dict]:
    """A fresh root URL on the store named, and its storage options."""
    fixture = {"gs": "gcs_bucket", "s3": "s3_bucket", "az": "azure_container"}[store]
    place = request.getfixturevalue(fixture)
    return place.url("serving"), dict(place.storage_options)


@pytest.mark.parametrize("store", STORES)
def test_a_conditional_overwrite_refuses_a_stale_token_on_every_store(store, request):
    from tf_export_pipeline.storage import open_storage

    url, options = _store_url(store, request)
    s = open_storage(url, options)
    path = s.join(s.root, "models.config")
    with pytest.raises(FileNotFoundError):
        s.read_versioned(path)
    first = s.write_if(path, b"one", None, {"tf_export_write": "a"})
    with pytest.raises(FileExistsError):
        s.write_if(path, b"not one", None)  # must not exist: it does
    data, token = s.read_versioned(path)
    assert data == b"one" and token == first
    assert s.token_of(path) == (first, {"tf_export_write": "a"})
    second = s.write_if(path, b"two", token)
    assert second != first
    with pytest.raises(FileExistsError):
        s.write_if(path, b"lost update", token)  # a writer that read "one" does not overwrite "two"
    assert s.read_versioned(path) == (b"two", second)


def _entry_versions(store, path: str) -> list[int]:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(store.read_bytes(path).decode(), model_server_config_pb2.ModelServerConfig())
    [entry] = [c for c in config.model_config_list.config if c.name == "demo_regressor"]
    return sorted(entry.model_version_policy.specific.versions)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["s3", "az"])
def test_newest_through_a_model_config_file_on_the_store_names_only_whole_versions(store, request, tmp_path,
                                                                                    trained_dir):
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage

    url, options = _store_url(store, request)
    if store == "s3":
        from tests.test_s3_store import upload_tree

        place = request.getfixturevalue("s3_bucket")
    else:
        from tests.test_azure_store import upload_tree

        place = request.getfixturevalue("azure_container")
    from tf_export_pipeline.demo import write_config

    upload_tree(place, trained_dir, "train")
    model_config = f"{url}/models.config"
    config = write_config(str(tmp_path), training_dir=place.url("train"), export_base=f"{url}/demo_regressor",
                          storage_options=options, versioning="step",
                          serving={"model_name": "demo_regressor", "model_config_file": model_config,
                                   "policy": "newest", "reload_seconds": 0})
    files = open_storage(url, options)
    publisher = Publisher(open_storage(f"{url}/demo_regressor", options))
    for step in (20, 30, 10):  # ckpt-10 last: published below 30, which stays the one served
        res = run_cli("run", "--checkpoint", f"ckpt-{step}", "--json", "--config", config, timeout=240)
        assert res.rc == 0 and res.json["status"] == "published", res.err
        listed = _entry_versions(files, files.join(files.root, "models.config"))
        assert listed == ([20] if step == 20 else [30]), (step, listed)
        assert all(publisher.is_whole(publisher.version_path(v)) for v in listed)
    labels = run_cli("labels", "--json", "--config", config, timeout=240)
    assert labels.rc == 0 and labels.json["versions"] == [30], labels.err
