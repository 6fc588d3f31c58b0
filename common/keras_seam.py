"""Every access of the project to Keras' private internals (keras 3.15.1).

One small function per patch; each checks :data:`PIN` and, with another Keras
installed, takes Keras' public path instead (one warning per process). The
``*_SOURCES`` constants hold the SHA-256 of the source of each Keras function a patch
reads or mimics, as found in 3.15.1 (``tests/test_flower_seam.py`` checks them).
"""

from __future__ import annotations

import logging

import keras

from common.pinned import Pin

log = logging.getLogger(__name__)

PIN = Pin("keras", "3.15.1", __name__,
          ("loss_tracker", "optimizer_state_variables", "seed_states"))

_SRC = "keras.src"

#: ``loss_tracker``: ``compile`` makes the tracker that ``metrics`` lists first and
#: Keras' own ``train_step`` updates with the loss.
LOSS_TRACKER_SOURCES = {
    f"{_SRC}.trainers.trainer:Trainer.compile":
        "98ee80c63ae7404a9639705452880812dfa63b57b94f6f64d24a8f0d8067b837",
    f"{_SRC}.trainers.trainer:Trainer.metrics":
        "4a85cfc21fb99c0bdf5399fa7dd12fc7b49b50d5636af5c53b48b65239433c17",
    f"{_SRC}.backend.tensorflow.trainer:TensorFlowTrainer.train_step":
        "debf0efab9d5794b017ade2937acbcc51886fc1dc5cf021e7d7e80f974ee707c",
}

#: ``optimizer_state_variables``: the learning rate is a tracked variable beside the
#: step count, and Adam's moments start at zero.
OPTIMIZER_STATE_SOURCES = {
    f"{_SRC}.optimizers.base_optimizer:BaseOptimizer.__init__":
        "7d5c171dfc92e81fc0d6247489c2ca78c02080d900679f5f0e04f4d651b3114f",
    f"{_SRC}.optimizers.base_optimizer:BaseOptimizer.variables":
        "4ba3d7e934922f58ab12245685e9438ec687ecbeddfac7f2528bb163bbaf0dd6",
    f"{_SRC}.optimizers.base_optimizer:BaseOptimizer._get_current_learning_rate":
        "fa62361e208633409ca414faca3990910049bc954bfa25d8a97f761e7771b65e",
    f"{_SRC}.optimizers.adam:Adam.build":
        "8ec7cbe349662b1bed6270d4b37756890055ac28d61a9ba2c18af54b889c2107",
}

#: ``seed_states``: the walk over a model and its sublayers, the layers that keep their
#: ``SeedGenerator`` as ``seed_generator``, and the generator's ``state`` variable.
SEED_GENERATOR_SOURCES = {
    f"{_SRC}.layers.layer:Layer._flatten_layers":
        "662dcf281bc32c5336057e11ad8ef125661f072a20004c328e8d3fae4263acbf",
    f"{_SRC}.layers.regularization.dropout:Dropout.__init__":
        "f8cddb18b9fa671aa5eec72e145d46d69b3f7b8b008aee0b750b3162acd388b7",
    f"{_SRC}.random.seed_generator:SeedGenerator.__init__":
        "eacd23d5320ca49acd74e41fa3a8181f8a79c142dc1f5e22dc3fca818a1e74f0",
}

#: Every patch of this module and the Keras sources it depends on.
PATCHES = {
    "loss_tracker": LOSS_TRACKER_SOURCES,
    "optimizer_state_variables": OPTIMIZER_STATE_SOURCES,
    "seed_states": SEED_GENERATOR_SOURCES,
}


def loss_tracker(model: keras.Model) -> keras.metrics.Metric:
    """The metric a compiled ``model``'s ``fit`` reports as ``loss``.

    A custom ``train_step`` updates it with its loss. With another Keras, the metric
    named ``loss`` among ``model.metrics`` (what Keras' guides do).
    """
    if PIN.holds():
        return model._loss_tracker
    return next(m for m in model.metrics if m.name == "loss")


def optimizer_state_variables(optimizer: keras.optimizers.Optimizer) -> list[keras.Variable]:
    """The built ``optimizer``'s variables that hold training state: all but the
    learning rate (the step count and, for Adam, the moments, all zero when fresh).

    With another Keras, the learning rate is found through the public
    ``optimizer.learning_rate``.
    """
    rate = (getattr(optimizer, "_learning_rate", None) if PIN.holds()
            else optimizer.learning_rate)
    keep = {id(rate)} if isinstance(rate, keras.Variable) else set()
    return [v for v in optimizer.variables if id(v) not in keep and "learning_rate" not in v.path]


def seed_states(model: keras.Model) -> list[tuple[int, keras.Variable]]:
    """The state variable of each ``SeedGenerator`` kept by ``model`` or a layer in it,
    with that layer's position in Keras' walk over the model and its sublayers.

    With another Keras, the variables named ``seed_generator_state`` among the public
    ``model.non_trainable_variables``, numbered by their place there (so the dropout
    streams derived from the numbers differ from 3.15.1's).
    """
    if not PIN.holds():
        return [(i, v) for i, v in enumerate(model.non_trainable_variables)
                if v.path.endswith("seed_generator_state")]
    return [(i, gen.state) for i, layer in enumerate(model._flatten_layers())
            if (gen := getattr(layer, "seed_generator", None)) is not None]
