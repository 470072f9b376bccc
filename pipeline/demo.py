"""A tiny model and a training job that writes checkpoints, for the demo and the tests.

Example::

    from tf_export_pipeline.demo import SERVING, train, write_config
    train("/tmp/demo/train", steps=30, checkpoint_every=10)
    config_path = write_config("/tmp/demo")
    with_labels = write_config("/tmp/demo", name="labels.yaml", serving=SERVING)
"""

from __future__ import annotations

import os

import yaml

FACTORY = "tf_export_pipeline.demo:build"

#: The demo's ``serving:`` section: the pipeline owns TF Serving's model config file, with labels.
#: ``reload_seconds: 0`` because no server watches the demo's file; with one, give its
#: ``--model_config_file_poll_wait_seconds`` (a label then moves after the server loaded the version).
SERVING = {"model_name": "demo_regressor", "model_config_file": "./serving/models.config", "policy": "labels",
           "canary_on_publish": True, "reload_seconds": 0}


def build(units: int = 8):
    """A small functional Keras regression model: input ``features`` [batch, 4] -> ``score`` [batch, 1]."""
    import keras

    inputs = keras.Input(shape=(4,), name="features", dtype="float32")
    hidden = keras.layers.Dense(units, activation="relu", name="hidden")(inputs)
    score = keras.layers.Dense(1, name="score")(hidden)
    return keras.Model(inputs, score, name="demo_regressor")


def build_wide():
    """The same model with a wider hidden layer: its checkpoints do not fit :func:`build`."""
    return build(units=16)


def train(training_dir: str, steps: int = 30, checkpoint_every: int = 10, start_step: int = 0,
          seed: int = 0, factory=build, max_to_keep: int | None = 10, resume: bool = True) -> list[str]:
    """Train on synthetic data, saving ``ckpt-<step>`` every ``checkpoint_every`` steps.

    Resumes from the newest checkpoint in ``training_dir`` when there is one, like
    a continuous-training job. Returns the prefixes written.
    """
    import numpy as np
    import tensorflow as tf

    model = factory()
    optimizer = tf.keras.optimizers.Adam(0.05)
    step = tf.Variable(start_step, dtype=tf.int64, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(ckpt, training_dir, max_to_keep=max_to_keep)
    if resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
    rng = np.random.default_rng(seed + int(step.numpy()))
    true_w = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    written = []
    for _ in range(steps):
        x = rng.standard_normal((32, 4)).astype("float32")
        y = x @ true_w + 0.1
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        step.assign_add(1)
        if int(step.numpy()) % checkpoint_every == 0:
            written.append(manager.save(checkpoint_number=int(step.numpy())))
    return written


def write_config(workdir: str, name: str = "export.yaml", **overrides) -> str:
    """Write a config for the demo model in ``workdir`` and return its path.

    Each keyword replaces (or, for a mapping, updates) that top-level key,
    e.g. ``serving=SERVING`` adds the demo's serving section.
    """
    os.makedirs(workdir, exist_ok=True)
    data = {
        "training_dir": "./train",
        "export_base": "./serving/demo_regressor",
        "model": {"factory": FACTORY, "checkpoint_key": "model"},
        "versioning": "timestamp",
        "max_claim_attempts": 10,
        "retention": {"keep": 5},
    }
    for key, value in overrides.items():
        current = data.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            data[key] = {**current, **value}
        else:
            data[key] = value
    path = os.path.join(workdir, name)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return path
