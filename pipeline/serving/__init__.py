"""Serving control: TF Serving's model config file, with stable and canary labels, promotion and rollback.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl
    control = ServingControl.from_config(load_config("serving.yaml"))
    control.promote(1732147200, label="stable", now=True)
    print(control.view()["labels"])      # {'stable': 1732147200, 'canary': ...}
    control.rollback(now=True)           # stable goes back to the previous stable

``serving.config_file`` reads and writes the file with TF Serving's own protos,
atomically on every store; ``serving.control`` owns one model's entry in it
and changes it in TF Serving's two steps; ``serving.labels`` holds the label
rules (stable, canary, the rollback target); ``serving.promotion`` runs a
promotion or rollback as the commands do; ``serving.history`` records every
write in the export base; ``serving.policy`` says what each ``serving.policy``
serves and when ``newest`` is called for.
"""

from tf_export_pipeline.serving.config_file import ConcurrentChange, ModelConfigFile, entry_of
from tf_export_pipeline.serving.control import ServingControl
from tf_export_pipeline.serving.labels import CANARY, STABLE
from tf_export_pipeline.serving.policy import newest_advice, served_version
from tf_export_pipeline.serving.promotion import move_label

__all__ = ["CANARY", "STABLE", "ConcurrentChange", "ModelConfigFile", "ServingControl", "entry_of", "move_label",
           "newest_advice", "served_version"]
