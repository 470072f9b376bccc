"""Model factories for the tests: variants of the demo model and a few other shapes of model."""

from __future__ import annotations

import numpy as np


def renamed_output():
    """The demo model with its output named ``prediction`` instead of ``score`` (same variables)."""
    import keras

    inputs = keras.Input(shape=(4,), name="features", dtype="float32")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    out = keras.layers.Dense(1, name="prediction")(hidden)
    return keras.Model(inputs, out)


def fixed_batch():
    """The demo model accepting only batches of 8: a narrower input shape."""
    import keras

    inputs = keras.Input(shape=(4,), batch_size=8, name="features", dtype="float32")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    out = keras.layers.Dense(1, name="score")(hidden)
    return keras.Model(inputs, out)


def noisy_serving():
    """A model whose traced serving function differs from the eager model: the noise is
    drawn in Python, so tracing bakes one draw into the graph while every eager call draws anew."""
    import keras

    class PythonNoise(keras.layers.Layer):
        def call(self, x):
            return x + float(np.random.default_rng().uniform(1.0, 2.0))

    inputs = keras.Input(shape=(4,), name="features", dtype="float32")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    out = keras.layers.Dense(1, name="score")(hidden)
    return keras.Model(inputs, PythonNoise()(out))


def two_inputs():
    """A multi-input functional model: ``age`` [batch, 1] and ``tokens`` [batch, 3] (int32)."""
    import keras

    age = keras.Input(shape=(1,), name="age", dtype="float32")
    tokens = keras.Input(shape=(3,), name="tokens", dtype="int32")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(10, 2, name="embed")(tokens))
    joined = keras.layers.Concatenate()([age, embedded])
    out = keras.layers.Dense(1, name="risk")(joined)
    return keras.Model([age, tokens], out)


def scorer_module():
    """A tf.Module with a hand-written serving signature."""
    import tensorflow as tf

    class Scorer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.normal([3, 1], seed=1), name="w")
            self.b = tf.Variable(0.5, name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

    return Scorer()


def save_checkpoints(factory, training_dir: str, steps=(10,), seed: int = 0, perturb=None) -> list[str]:
    """Write ``ckpt-<step>`` checkpoints of a fresh model, changing its weights between them."""
    import tensorflow as tf

    model = factory()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), training_dir, max_to_keep=None)
    rng = np.random.default_rng(seed)
    out = []
    for step in steps:
        for v in model.trainable_variables:
            dtype = v.dtype if isinstance(v.dtype, str) else v.dtype.as_numpy_dtype
            v.assign_add(rng.normal(0, 0.1, tuple(v.shape)).astype(dtype))
        if perturb is not None:
            perturb(model)
        out.append(manager.save(checkpoint_number=step))
    return out


def lookup_model():
    """A model with a lookup table (StringLookup): a resource the SavedModel must carry besides variables."""
    import keras

    word = keras.Input(shape=(1,), dtype="string", name="word")
    index = keras.layers.StringLookup(vocabulary=["a", "b", "c"])(word)
    embedded = keras.layers.Flatten()(keras.layers.Embedding(5, 2)(index))
    return keras.Model(word, keras.layers.Dense(1, name="score")(embedded))


#: The extra weight of :func:`padded`: 1 Mi float32, 4 MiB, many times the demo model's size.
PADDING_FLOATS = 1 << 20


def padded():
    """The demo model with a large extra weight that its output depends on (times zero): a model grown in size."""
    import keras

    class Padding(keras.layers.Layer):
        def build(self, input_shape):
            self.pad = self.add_weight(shape=(PADDING_FLOATS,), initializer="zeros", trainable=False, name="pad")

        def call(self, x):
            return x + 0.0 * keras.ops.sum(self.pad)

    inputs = keras.Input(shape=(4,), name="features", dtype="float32")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    out = keras.layers.Dense(1, name="score")(Padding(name="padding")(hidden))
    return keras.Model(inputs, out, name="demo_regressor")


#: The width and depth of :func:`heavy`'s extra work: a few milliseconds a batch on one core, so that the
#: model's own compute, not the Session's fixed cost per call, sets its latency.
BURN_WIDTH = 512
BURN_STEPS = 40


def _burning(repeat: int):
    import keras

    class Burn(keras.layers.Layer):
        """Matrix products whose result is added times zero: work that changes latency, not outputs."""

        def build(self, input_shape):
            self.mix = self.add_weight(shape=(BURN_WIDTH, BURN_WIDTH), initializer="orthogonal", trainable=False,
                                       name="mix")

        def call(self, x):
            t = keras.ops.tile(x[:, :1], (1, BURN_WIDTH))
            for _ in range(BURN_STEPS * repeat):
                t = keras.ops.tanh(keras.ops.matmul(t, self.mix))
            return x + 0.0 * keras.ops.sum(t, axis=1, keepdims=True)

    inputs = keras.Input(shape=(4,), name="features", dtype="float32")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    out = keras.layers.Dense(1, name="score")(Burn(name="burn")(hidden))
    return keras.Model(inputs, out, name="demo_regressor")


def heavy():
    """The demo model with extra compute (same outputs, same variables as :func:`heavy_slowed`)."""
    return _burning(1)


def heavy_slowed():
    """:func:`heavy` doing three times the extra compute: the same outputs from the same checkpoint,
    about three times slower to answer."""
    return _burning(3)
