"""The export configuration: one pydantic model of the YAML file.

Example::

    from tf_export_pipeline.config import load_config
    cfg = load_config("serving.yaml")
    print(cfg.export_base, cfg.versioning, cfg.config_hash)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.layout import Versioning
from tf_export_pipeline.redaction import GCS_TOKEN_KEYWORDS, register_options
from tf_export_pipeline.schedules import check_schedule


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExampleFeatureConfig(_Strict):
    dtype: Literal["float32", "int64", "string"] = Field(description="the tf.Example list type of the feature")
    shape: list[int] = Field(default_factory=list, description="shape of one example's value ([] for a scalar)")
    default: Any = Field(None, description="value when an example lacks the feature; none makes it required")


class ExampleSignatureConfig(_Strict):
    name: str = Field("examples", min_length=1, description="signature key of the tf.Example-parsing signature")
    features: dict[str, ExampleFeatureConfig] = Field(min_length=1, description="feature spec, one per model input")


class ModelConfig(_Strict):
    # `format` comes first: whether a factory is required depends on it.
    format: Literal["auto", "checkpoint", "keras"] = Field(
        "auto", description="checkpoint: tf.train.Checkpoint files; keras: *.keras files; auto: detected")
    factory: str | None = Field(None, validate_default=True,
                                description="module:callable returning a Keras model, a tf.Module or endpoints")
    checkpoint_key: str = Field("model", description="attribute the model was saved under in tf.train.Checkpoint")
    step_pattern: str = Field(r"(\d+)", description="regex whose first group is the epoch/step in a .keras file name")
    example_signature: ExampleSignatureConfig | None = Field(
        None, description="adds a signature that parses a batch of serialized tf.Example")

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("format") != "keras":  # a .keras file carries its architecture; nothing else does
                raise PydanticCustomError("missing", "Field required")
            return value
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"must look like 'package.module:callable', got {value!r}")
        return value

    @field_validator("step_pattern")
    @classmethod
    def _pattern_form(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression ({err}): {value!r}") from None
        if compiled.groups < 1:
            raise ValueError(f"needs a group that captures the number, e.g. 'model-(\\d+)': {value!r}")
        return value

    def shaping(self) -> dict[str, Any]:
        """What of this section shapes the exported artifact (how checkpoints are found does not)."""
        return self.model_dump(exclude_none=True, exclude={"format", "step_pattern"})


class RetentionConfig(_Strict):
    keep: int = Field(5, ge=1, description="newest versions to keep")
    pinned: list[int] = Field(default_factory=list, description="versions never removed")
    lease_seconds: int = Field(86400, ge=1, description="staging unused this long counts as abandoned: gc may remove "
                                                          "it, and a publish refuses it")


#: TF Serving refuses to load a saved_model.pb above 1 GiB.
MAX_GRAPH_BYTES = 1 << 30


class ValidationConfig(_Strict):
    timeout_seconds: int = Field(300, ge=10, description="limit for the fresh-process load and smoke run")
    contract: str | None = Field(None, description="YAML file of the signatures the model must have, exactly")
    samples: str | None = Field(None, description=".npz with one array per input of serving_default")
    rtol: float = Field(1e-5, ge=0, description="relative tolerance of the parity check")
    atol: float = Field(1e-6, ge=0, description="absolute tolerance of the parity check")
    allow_breaking: bool = Field(False, description="publish even when signatures break against the live version")
    warmup: bool = Field(False, description="write assets.extra/tf_serving_warmup_requests from the samples")
    max_size_ratio: float | None = Field(2.0, gt=0, description="refuse a model more than this many times the "
                                                                "reference version's bytes; none: no limit")
    max_graph_bytes: int = Field(MAX_GRAPH_BYTES, gt=0, description="refuse a saved_model.pb larger than this "
                                                                    "(TF Serving's limit), whatever the override")
    max_latency_ratio: float | None = Field(1.5, gt=0, description="refuse a model whose median latency (sample "
                                                                   "batch or batch of 1) is more than this many "
                                                                   "times the reference version's; none: not timed")
    latency_rounds: int = Field(30, ge=5, description="interleaved rounds of the latency measurement (each runs "
                                                      "both models on both batch sizes)")
    allow_regression: bool = Field(False, description="publish even when the size or latency ratio is above its "
                                                      "limit")


class MetricsConfig(_Strict):
    statsd: str | None = Field(None, description="host:port of a StatsD server the command line sends metrics to "
                                                 "($TF_EXPORT_STATSD wins; Airflow tasks use Airflow's own metrics)")

    @field_validator("statsd")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is not None:
            from tf_export_pipeline.metrics import parse_address

            parse_address(value)  # a ValueError names the value
        return value


class GateConfig(_Strict):
    metric: str = Field(description="name of the metric")
    mode: Literal["min", "max"] = Field(description="min: lower is better; max: higher is better")
    source: str = Field(description="JSON file ({step}/{name} placeholders) or TensorBoard event directory")


class ServingConfig(_Strict):
    model_name: str = Field(min_length=1, description="the model name clients use (ModelConfig.name)")
    model_config_file: str = Field(description="TF Serving's --model_config_file: a local path or gs://, s3://, "
                                               "az:// URL the pipeline owns one entry of")
    policy: Literal["latest", "labels", "newest"] = Field(
        "latest", description="latest: the highest version is served; labels: the versions labelled "
                              "stable and canary are served; newest: the highest version is served, each "
                              "one listed alone in the model config file once it is whole (for stores "
                              "without an atomic folder rename: promotion object_move)")
    canary_on_publish: bool = Field(True, description="each published version gets the label canary")
    reload_seconds: int = Field(60, ge=0, description="the server's --model_config_file_poll_wait_seconds")


AUTO_FINISH = "auto"
#: What ``airflow.finish_schedule: auto`` means on an object store: TF Serving retries a failed load 5 times a
#: minute apart (--max_num_load_retries, --load_retry_interval_micros), so a version finished within that
#: window is loaded after all.
FINISH_EVERY = "*/3 * * * *"


class AirflowConfig(_Strict):
    schedule: str | None = Field("@daily", description="cron or preset of the nightly DAG")
    max_active_tis_per_dagrun: int = Field(4, ge=1, description="parallel exports in one backfill run")
    conn_id: str | None = Field(None, description="Airflow connection resolved into storage_options")
    promote_schedule: str | None = Field(None, description="cron or preset of the promote DAG's canary check "
                                                           "(needs serving.policy: labels); none: manual runs only")
    soak_seconds: int = Field(86400, ge=0, description="how long a version is canary before the promote DAG's "
                                                       "check makes it stable")
    finish_schedule: str | None = Field(
        "auto", description="cron or preset of the finish DAG, which finishes promotions cut short on an object "
                            "store; auto: every 3 minutes (inside TF Serving's 5 load retries a minute apart) "
                            "when the export base is a cloud URL, no DAG on local disk; none: no DAG")

    @field_validator("schedule", "promote_schedule")
    @classmethod
    def _schedule_form(cls, value: str | None) -> str | None:
        # Airflow drops a DAG whose schedule it cannot read: refused here, every command says so.
        return check_schedule(value)

    @field_validator("finish_schedule")
    @classmethod
    def _finish_schedule_form(cls, value: str | None) -> str | None:
        return value if value == AUTO_FINISH else check_schedule(value)


class Config(_Strict):
    training_dir: str = Field(description="folder (or URL) where the training job writes its checkpoints")
    export_base: str = Field(description="folder (or URL) TF Serving watches (model_base_path): versions are its "
                                         "integer-named children")
    model: ModelConfig = Field(description="the model: how its checkpoints are found and rebuilt for export")
    versioning: Versioning = Field("timestamp", description="version numbers: timestamp (export time in seconds), "
                                                            "checkpoint_time (when the checkpoint was written) or "
                                                            "step (the checkpoint's global step)")
    max_claim_attempts: int = Field(10, ge=1, le=1000, description="version numbers tried after a collision "
                                                                   "before the publish fails")
    retention: RetentionConfig = Field(default_factory=RetentionConfig,
                                       description="which versions prune keeps, and when staging is abandoned")
    validation: ValidationConfig = Field(default_factory=ValidationConfig,
                                         description="the validation gate every export passes before it is "
                                                     "published")
    gate: GateConfig | None = Field(None, description="the metric gate: a checkpoint worse than the live "
                                                      "version is not published; none: no metric gate")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the fsspec "
                                                                              "filesystem (object stores)")
    promotion: Literal["auto", "rename", "object_move"] = Field(
        "auto", description="how staging becomes a version: rename (one atomic rename), object_move (object by "
                            "object, saved_model.pb last) or auto (what the store offers)")
    airflow: AirflowConfig = Field(default_factory=AirflowConfig, description="the DAGs of this config")
    serving: ServingConfig | None = Field(None, description="TF Serving's model config file, owned by the "
                                                            "pipeline; none: the highest version is served")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="where the command line sends "
                                                                              "metrics")

    _config_dir: str = PrivateAttr(default_factory=os.getcwd)
    _source: str | None = PrivateAttr(default=None)

    @property
    def config_dir(self) -> str:
        return self._config_dir

    @property
    def source(self) -> str | None:
        """Path of the YAML file this config came from, if any."""
        return self._source

    @property
    def config_hash(self) -> str:
        """Hash of what shapes the exported artifact; part of the ledger key.

        Versioning, retention and storage settings are left out on purpose: a
        backfill under ``checkpoint_time`` must recognise the checkpoints a
        nightly run already exported under ``timestamp``.
        """
        shaping: dict[str, Any] = {"model": self.model.shaping()}
        if self.validation.warmup:
            shaping["warmup"] = True  # the warmup file is part of the version
        blob = json.dumps(shaping, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def finish_schedule(self) -> str | None:
        """The finish DAG's schedule, ``airflow.finish_schedule`` with ``auto`` resolved: on local disk a
        promotion is one rename and nothing is left to finish, so no DAG."""
        value = self.airflow.finish_schedule
        if value != AUTO_FINISH:
            return value
        return FINISH_EVERY if is_url(self.export_base) and not self.export_base.startswith("file://") else None

    def with_overrides(self, **changes: Any) -> Config:
        clone = self.model_copy(update=changes)
        clone._config_dir = self._config_dir
        clone._source = self._source
        return clone


def is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base_dir: str) -> str:
    if is_url(path) and not path.startswith("file://"):
        return path
    if path.startswith("file://"):
        path = path[len("file://"):]
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(base_dir, path))


def _is_gcs(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("gs", "gcs") if is_url(url) else False


def _check_gcs_token(cfg: Config, base_dir: str, where: str) -> None:
    """A string ``token`` for gcsfs must name a file or a keyword; a relative file is taken from the config's folder.

    gcsfs takes any other string for a raw access token and sends it in a URL
    (``tokeninfo?access_token=...``), which a connection error then prints.
    The error names the key but never the value: it may be that very token.
    """
    token = cfg.storage_options.get("token")
    if token is None or isinstance(token, dict) or not any(_is_gcs(u) for u in (cfg.training_dir, cfg.export_base)):
        return
    if isinstance(token, str):
        if token in GCS_TOKEN_KEYWORDS:
            return
        path = _resolve(token, base_dir) if not is_url(token) else None
        if path and os.path.isfile(path):
            cfg.storage_options["token"] = path
            return
        what = "neither an existing file nor one of " + ", ".join(GCS_TOKEN_KEYWORDS)
    else:
        what = f"a {type(token).__name__}; give a file path, one of {', '.join(GCS_TOKEN_KEYWORDS)} or a mapping"
    raise ConfigError(f"invalid config: bad value for 'storage_options.token': {what} (the value is not shown; "
                      f"service-account info goes in as a mapping, a raw access token is not accepted): {where}")


def config_from_dict(data: dict[str, Any], base_dir: str, source: str | None = None) -> Config:
    where = source or "<config>"
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values: {where}")
    # Registered before anything can fail, so no error about this config can print one of its secrets.
    register_options(data.get("storage_options"))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top)"
        kind = first["type"]
        if kind == "extra_forbidden":
            msg = f"unknown key '{loc}'"
        elif kind == "missing":
            msg = f"missing key '{loc}'"
        else:
            msg = f"bad value for '{loc}': {first['msg']}"
        more = len(err.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"invalid config: {msg}{suffix}: {where}") from None
    cfg.training_dir = _resolve(cfg.training_dir, base_dir)
    cfg.export_base = _resolve(cfg.export_base, base_dir)
    _check_gcs_token(cfg, base_dir, where)
    for section, key in (("validation", "contract"), ("validation", "samples"), ("gate", "source"),
                         ("serving", "model_config_file")):
        holder = getattr(cfg, section)
        if holder is not None and getattr(holder, key):
            setattr(holder, key, _resolve(getattr(holder, key), base_dir))
    cfg._config_dir = os.path.abspath(base_dir)
    cfg._source = source
    return cfg


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a YAML file."""

    def __init__(self, key: str, line: int):
        super().__init__(f"duplicate key '{key}' at line {line}")
        self.key, self.line = key, line


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently).

    A merge key (``<<: *anchor``) is not a duplicate: the mapping's own keys override merged ones.
    """

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._refuse_duplicates(node, (), set())
        return self.construct_document(node)

    def _refuse_duplicates(self, node, path: tuple[str, ...], seen: set[int]) -> None:
        if id(node) in seen:  # an alias met again
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._refuse_duplicates(value_node, path, seen)
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, key_node.value) in keys:
                        raise DuplicateKey(".".join((*path, name)), key_node.start_mark.line + 1)
                    keys.add((key_node.tag, key_node.value))
                self._refuse_duplicates(value_node, (*path, name), seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, (*path, str(i)), seen)


def load_config(path: str) -> Config:
    """Read and validate a YAML config; relative paths are taken from the file's folder."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=StrictLoader)
    except DuplicateKey as err:
        raise ConfigError(f"invalid config: {err}: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config is not valid YAML{where}: {path}") from None
    return config_from_dict(data, os.path.dirname(path), source=path)
