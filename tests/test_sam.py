"""--sam_rho: the step's gradient is the one taken at w + rho g / |g|, the weights and batch-norm
statistics come back as they were, and the update applies that gradient."""
import numpy as np
import pytest
import tensorflow as tf

import hw2
import training
import utils

RHO = 0.5
BATCH = 6


def setup():
    # No dropout (its masks would differ between the passes) and plain SGD, so the update is -lr g.
    cfg = utils.load_config("tiny", {"keep_prob_1": "1", "keep_prob_2": "1", "keep_prob_dense": "1",
                                     "optimizer": "sgd", "momentum": "0", "learning_rate": "0.1",
                                     "precision": "fp32", "sam_rho": str(RHO)})
    state = training.create_train_state(cfg, 3, tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 3, size=BATCH).astype(np.int32))
    return cfg, state, images, labels


def gradient_at(model, images, labels):
    with tf.GradientTape() as tape:
        total, _ = hw2.loss(hw2.inference(model, images, training=True), labels, model, BATCH)
    return tape.gradient(total, model.trainable_variables)


def by_hand(model, images, labels):
    """The plain gradient, and the one at w + RHO g / |g| taken by moving the weights and back."""
    weights = [v.numpy() for v in model.trainable_variables]
    g = gradient_at(model, images, labels)
    norm = float(tf.linalg.global_norm(g))
    for v, w, gi in zip(model.trainable_variables, weights, g):
        v.assign(w + RHO * gi.numpy() / norm)
    sharp = [t.numpy() for t in gradient_at(model, images, labels)]
    for v, w in zip(model.trainable_variables, weights):
        v.assign(w)
    return weights, g, sharp


def stats_of(model):
    return [v.numpy() for v in hw2.batch_norm_statistics(model)]


def test_the_gradient_is_taken_rho_along_the_normalized_gradient_and_everything_comes_back():
    cfg, state, images, labels = setup()
    model = state.model
    stats = stats_of(model)
    weights, g, expected = by_hand(model, images, labels)
    for v, s in zip(hw2.batch_norm_statistics(model), stats):  # the hand passes moved them
        v.assign(s)

    sharp = tf.function(lambda: hw2.sharpness_aware(model, g, RHO, images, labels, None, BATCH, 0.0, None,
                                                    state.optimizer))()
    for got, want in zip(sharp, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)
    # a real move: the sharp gradient is not the plain one
    assert max(np.abs(s.numpy() - gi.numpy()).max() for s, gi in zip(sharp, g)) > 1e-3
    for v, w in zip(model.trainable_variables, weights):
        np.testing.assert_array_equal(v.numpy(), w)
    for got, want in zip(stats_of(model), stats):
        np.testing.assert_array_equal(got, want)


def test_the_train_step_applies_the_sharp_gradient():
    cfg, state, images, labels = setup()
    model = state.model
    weights, _, sharp = by_hand(model, images, labels)
    step = hw2.make_train_step(model, state.optimizer, state.ema, tf.distribute.get_strategy(), BATCH,
                               sam_rho=RHO)
    step(iter(tf.data.Dataset.from_tensors((images, labels)).repeat()))
    for v, w, s in zip(model.trainable_variables, weights, sharp):
        np.testing.assert_allclose(v.numpy(), w - 0.1 * s, rtol=1e-4, atol=1e-6)


def test_several_replicas_are_refused_in_one_line():
    cfg = utils.load_config("tiny", {"sam_rho": "0.05"})
    with pytest.raises(utils.UserError, match="sam_rho"):
        training.check_replicas(cfg, replicas=2)
    training.check_replicas(cfg, replicas=1)
