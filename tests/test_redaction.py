"""No secret in any output: the redactor, the config's token check, and the real ``tf-export`` on failing storage.

The Airflow side (trigger events, operator errors, XCom, the task log) is in
``tests/airflow/test_redaction.py``, where Airflow has its test home.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import pytest

from tests.conftest import one_line_error, run_cli
from tf_export_pipeline import redaction
from tf_export_pipeline.demo import write_config

pytestmark = pytest.mark.timeout(120)

CLOSED = "http://127.0.0.1:1"  # nothing listens on port 1: every connection is refused at once


def secret(kind: str = "secret") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def assert_nowhere(needles, *haystacks: str) -> None:
    for needle in needles:
        for hay in haystacks:
            assert needle not in hay, f"a secret leaked: ...{hay[max(0, hay.find(needle) - 200):][:400]}..."


def rsa_pem() -> str:
    """A real (throw-away) RSA key in PKCS#8 PEM, so google-auth accepts it and the failure is the connection."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture
def fresh_redactor():
    """The process-wide registry, emptied before and after (secrets registered by a test stay in that test)."""
    redaction.REDACTOR.clear()
    yield redaction.REDACTOR
    redaction.REDACTOR.clear()


# -- the redactor --------------------------------------------------------------------------------
def test_tokens_in_urls_are_redacted():
    token = "ya29.a0AfH6SMBx-" + uuid.uuid4().hex
    text = (f"HTTPSConnectionPool(host='oauth2.googleapis.com', port=443): Max retries exceeded with url: "
            f"/tokeninfo?access_token={token}&alt=json (Caused by NameResolutionError(...))")
    out = redaction.redact(text)
    assert token not in out
    assert "/tokeninfo?access_token=***&alt=json (Caused by NameResolutionError" in out
    plain = secret()
    assert redaction.redact(f"GET /b/o?token={plain}") == "GET /b/o?token=***"
    assert redaction.redact(f"https://s.example/o?X-Goog-Signature={plain}&x=1") == \
        "https://s.example/o?X-Goog-Signature=***&x=1"
    assert redaction.redact(f"https://h.example/o?key={plain}") == "https://h.example/o?key=***"
    assert redaction.redact(f"proxy http://user:{plain}@proxy:3128/ refused") == \
        "proxy http://user:***@proxy:3128/ refused"
    assert redaction.redact(f"{{'Authorization': 'Bearer {plain}'}}") == "{'Authorization': 'Bearer ***'}"
    assert redaction.redact(f"Authorization: Bearer {plain}") == "Authorization: Bearer ***"
    # Words and code stay: only values are masked.
    for harmless in ("KeyError: 'refresh_token'", 'refresh_token=token["refresh_token"],', "ledger_key=ab12cd34ef",
                     "check the credentials in storage_options", "gs://bucket/serving/demo_regressor/17"):
        assert redaction.redact(harmless) == harmless


def test_pem_blocks_and_private_key_fields_are_redacted():
    pem = rsa_pem()
    body = pem.splitlines()[5]
    assert body not in redaction.redact(f"could not load\n{pem}\nend")
    assert redaction.redact(f"could not load\n{pem}end") == "could not load\n***\nend"
    info = {"type": "service_account", "private_key": pem, "client_email": "exporter@proj.iam.gserviceaccount.com"}
    as_json = redaction.redact(json.dumps(info))
    assert body not in as_json and json.loads(as_json)["private_key"] == "***"
    assert json.loads(as_json)["client_email"] == info["client_email"]  # names who, proves nothing
    assert body not in redaction.redact(repr(info))
    cut = json.dumps(info)[:200]  # a message cut short in the middle of the key
    assert "MII" not in redaction.redact(cut)


def test_registered_secrets_are_redacted_in_every_spelling(fresh_redactor):
    token, header, json_secret = secret("token"), secret("header") + "/+=&", secret("sa-id")
    redaction.register_options({
        "token": {"type": "service_account", "private_key_id": json_secret, "project_id": "proj-a"},
        "endpoint_url": CLOSED, "project": "proj-a", "requester_pays": True,
        "session_kwargs": {"headers": {"X-Custom-Credential": header}},
        "client_kwargs": {"aws_session_token": token},
    })
    line = f"{token} / {header} / {json.dumps(header)} / {repr(header)} / {json_secret}"
    from urllib.parse import quote, quote_plus
    line += f" / ?h={quote(header, safe='')} / {quote_plus(header)}"
    out = redaction.redact(line)
    assert_nowhere([token, header, json_secret, quote(header, safe=""), quote_plus(header)], out)
    # Where and which project are not secret, and gcsfs's keywords and short values are never masked.
    assert redaction.redact(f"{CLOSED} proj-a anon google_default") == f"{CLOSED} proj-a anon google_default"
    redaction.register_options({"token": "anon", "password": "abc"})
    assert redaction.redact("anonymous abc") == "anonymous abc"


def test_a_token_that_is_a_file_stays_visible_and_a_keyfile_string_is_split(fresh_redactor, tmp_path):
    keyfile = tmp_path / "sa.json"
    keyfile.write_text("{}")
    inner = secret("pk")
    redaction.register_options({"token": str(keyfile), "keyfile_dict": json.dumps({"private_key": inner})})
    assert redaction.redact(f"cannot read {keyfile}") == f"cannot read {keyfile}"
    assert inner not in redaction.redact(f"key {inner}")


def test_logging_filter_redacts_messages_args_and_tracebacks(fresh_redactor):
    token = secret("token")
    redaction.register(token)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
            self.format(record)

    logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex}")
    logger.propagate = False
    handler = Keep()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    redaction.install(logger)
    try:
        raise ConnectionError(f"url: /tokeninfo?access_token={token}")
    except ConnectionError:
        logger.warning("poll failed with %s", {"token": token}, exc_info=True)
    logger.error("plain %s", f"Bearer {token}")
    shown = "\n".join(handler.format(r) for r in records)
    assert_nowhere([token], shown)
    assert "poll failed with {'token': '***'}" in shown and "access_token=***" in shown
    assert "Traceback" in shown or "ConnectionError" in shown  # the traceback is kept, redacted


def test_scrubbed_error_keeps_its_class_and_meaning_without_the_secret(fresh_redactor):
    import traceback

    from tf_export_pipeline.errors import PipelineError

    token = secret("token")
    redaction.register(token)
    try:
        try:
            raise ConnectionError(f"refused: {token}")
        except ConnectionError as inner:
            raise PipelineError(f"storage unreachable ({token}): gs://b/x") from inner
    except PipelineError as err:
        safe = redaction.scrub_exception(err)
    assert type(safe) is PipelineError and str(safe) == "storage unreachable (***): gs://b/x"
    shown = "".join(traceback.format_exception(safe))
    assert_nowhere([token], shown)
    assert "ConnectionError: refused: ***" in shown  # the cause survives, redacted, as a note
    clean = ValueError("nothing secret here")
    assert redaction.scrub_exception(clean) is clean


# -- the config: a string token must be a file or a keyword ------------------------------------------
def test_config_rejects_a_raw_token_without_echoing_it(tmp_path):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.errors import ConfigError

    token = secret("ya29")
    path = write_config(str(tmp_path), export_base="gs://bucket/x", storage_options={"token": token})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert token not in message and "'storage_options.token'" in message and message.endswith(path)
    assert caught.value.exit_code == 2

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "sa.json").write_text("{}")
    for ok in ("anon", "google_default", "./keys/sa.json", {"type": "service_account", "private_key": "x"}):
        cfg = load_config(write_config(str(tmp_path), export_base="gs://bucket/x", storage_options={"token": ok}))
        if ok == "./keys/sa.json":  # like every path in the config, taken from the config's folder
            assert cfg.storage_options["token"] == str(tmp_path / "keys" / "sa.json")
    # s3fs's token is a session token, a plain string: only gcsfs's is checked
    load_config(write_config(str(tmp_path), export_base="s3://bucket/x", storage_options={"token": token}))


def test_cli_rejects_a_raw_token_with_one_line_and_no_secret(tmp_path):
    """The reported bug: gcsfs sent the token as ?access_token=... and the connection error printed it."""
    token = secret("ya29")
    config = write_config(str(tmp_path), training_dir="gs://bucket/train", export_base="gs://bucket/x",
                          storage_options={"token": token, "endpoint_url": CLOSED})
    for extra in ((), ("--verbose",), ("--json",)):
        res = run_cli("run", "--config", config, *extra, timeout=120)
        assert res.rc == 2, res.err
        line = res.err.strip().splitlines()[-1]
        assert line.startswith("tf-export: error: invalid config: bad value for 'storage_options.token'")
        assert line.endswith(config)
        if not extra:
            assert one_line_error(res) == line
        assert_nowhere([token], res.out, res.err)


def _service_account(private_key: str, key_id: str) -> dict:
    return {"type": "service_account", "project_id": "proj-redact", "private_key_id": key_id,
            "private_key": private_key, "client_email": "exporter@proj-redact.iam.gserviceaccount.com",
            "client_id": "1234567890", "token_uri": f"{CLOSED}/token",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth"}


@pytest.mark.parametrize("command", ["discover", "status"])
def test_cli_on_refused_storage_prints_no_credential(tmp_path, command):
    """Service-account info as the token, the storage endpoint and the token endpoint both refusing connections."""
    pem, key_id, header = rsa_pem(), secret("key-id"), secret("header")
    config = write_config(str(tmp_path), training_dir="gs://bucket/train", export_base="gs://bucket/x",
                          storage_options={"token": _service_account(pem, key_id), "endpoint_url": CLOSED,
                                           "session_kwargs": {"headers": {"X-Credential": header}}})
    needles = [key_id, header] + [line for line in pem.splitlines() if "-----" not in line]
    quiet = run_cli(command, "--config", config, timeout=60)
    assert quiet.rc == 1, quiet.err
    line = one_line_error(quiet)
    assert "gs://bucket/" in line
    loud = run_cli(command, "--config", config, "--verbose", timeout=60)
    assert loud.rc == 1 and "Traceback" in loud.err
    assert loud.err.strip().splitlines()[-1] == line
    as_json = run_cli(command, "--config", config, "--json", timeout=60)
    assert as_json.rc == 1
    assert_nowhere(needles, quiet.out, quiet.err, loud.out, loud.err, as_json.out, as_json.err)


def test_cli_redacts_errors_tracebacks_and_output_of_any_command(tmp_path, monkeypatch, capsys, fresh_redactor,
                                                                  request):
    """What a library puts in an error (here a URL with a token and a registered secret) never reaches the terminal.

    The command is replaced by one that fails the way google-auth fails when
    requests cannot connect, whatever the real storage layer does with it today.
    """
    from google.auth.exceptions import TransportError

    from tf_export_pipeline import cli

    header = secret("header")
    config = write_config(str(tmp_path), export_base="gs://bucket/x",
                          storage_options={"token": "anon", "session_kwargs": {"headers": {"X-Credential": header}}})
    raw = secret("raw")

    def failing(args, cfg):
        raise TransportError(
            f"HTTPSConnectionPool(host='oauth2.googleapis.com', port=443): Max retries exceeded with url: "
            f"/tokeninfo?access_token={raw} (Caused by ProxyError('Unable to connect to proxy', header {header}))")

    def printing(args, cfg):
        cli._emit(args, {"storage_options": cfg.storage_options}, f"options: {cfg.storage_options}")
        return 0

    # main() sets these for the process (quiet TensorFlow, or verbose); later tests' subprocesses inherit os.environ
    saved_env = dict(os.environ)
    request.addfinalizer(lambda: (os.environ.clear(), os.environ.update(saved_env)))
    for verbose in ([], ["--verbose"]):
        monkeypatch.setitem(cli.COMMANDS, "status", failing)
        assert cli.main(["status", "--config", config, *verbose]) == 1
        out, err = capsys.readouterr()
        assert_nowhere([raw, header], out, err)
        assert "access_token=***" in err and err.count("tf-export: error: unexpected TransportError") == 1
        assert ("Traceback" in err) == bool(verbose)
    for as_json in ([], ["--json"]):
        monkeypatch.setitem(cli.COMMANDS, "status", printing)
        assert cli.main(["status", "--config", config, *as_json]) == 0
        out, err = capsys.readouterr()
        assert_nowhere([header], out, err)
        assert "***" in out
        if as_json:
            assert json.loads(out)["storage_options"]["session_kwargs"]["headers"]["X-Credential"] == "***"
