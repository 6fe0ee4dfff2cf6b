"""--mix mixup | cutmix: the mixed batch, its label weight and its loss match the formulas; a run
that mixes is a pure function of (seed, step), so it resumes to the uninterrupted result."""
import numpy as np
import pytest
import tensorflow as tf

import hw2
import hw2_train
import mixing
import utils
from helpers import make_image_folder


def batch(n=6, size=8):
    images = tf.random.stateless_uniform([n, size, size, 3], [1, 2])
    return images, tf.range(n, dtype=tf.int32)


def seed(step):
    return tf.constant([0, step], tf.int64)


def test_mixup_blends_each_image_with_its_mirror_by_lam():
    images, labels = batch()
    mixed, partner, lam = mixing.mix_batch(images, labels, "mixup", 1.0, seed(3))
    lam = float(lam)
    assert 0.5 <= lam <= 1.0
    np.testing.assert_array_equal(partner, labels.numpy()[::-1])
    np.testing.assert_allclose(mixed, lam * images.numpy() + (1 - lam) * images.numpy()[::-1], rtol=1e-6)


def test_cutmix_pastes_one_box_of_the_mirror_and_lam_is_the_share_left():
    images, labels = batch(size=16)
    for step in range(5):
        mixed, partner, lam = mixing.mix_batch(images, labels, "cutmix", 1.0, seed(step))
        own = np.all(mixed.numpy() == images.numpy(), axis=(0, 3))  # [H, W]: pixel kept in every image
        other = np.all(mixed.numpy() == images.numpy()[::-1], axis=(0, 3))
        assert np.all(own | other)
        pasted = ~own
        assert float(lam) == pytest.approx(1 - pasted.mean())
        rows, cols = np.nonzero(pasted)
        if rows.size:  # one solid rectangle
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_lam_is_folded_beta_and_a_function_of_the_seed_only():
    """Beta(1, 1) folded to [0.5, 1] is uniform there: mean 0.75. The same (seed, step) draws the
    same lam; another step draws another."""
    draws = np.array([float(mixing.mix_weight(1.0, seed(s))) for s in range(400)])
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    assert draws.mean() == pytest.approx(0.75, abs=0.02)
    assert float(mixing.mix_weight(1.0, seed(7))) == draws[7] != draws[8]
    # a small alpha puts lam near 1 (little mixing), as mixup's alpha does
    assert np.mean([float(mixing.mix_weight(0.1, seed(s))) for s in range(100)]) > 0.9


def test_mixed_loss_is_lam_times_each_labels_loss_with_smoothing_and_weights():
    logits = tf.constant([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    labels, partner, lam, eps = tf.constant([0, 1]), tf.constant([1, 0]), 0.7, 0.1
    weights = np.array([0.5, 2.0, 1.0], np.float32)
    net = hw2.create_model(utils.load_config("tiny", {"model": "simple_cnn", "fc_units": "8",
                                                      "weight_decay": "0"}), 3)
    _, ce = hw2.loss(logits, labels, net, 2, eps, weights, (partner, tf.constant(lam)))

    def one(label):  # smoothed cross-entropy and weight of each example against `label`
        target = tf.one_hot(label, 3) * (1 - eps) + eps / 3
        return -tf.reduce_sum(target * tf.nn.log_softmax(logits), -1).numpy(), weights[label.numpy()]

    (ce_a, w_a), (ce_b, w_b) = one(labels), one(partner)
    expected = (lam * w_a + (1 - lam) * w_b) * (lam * ce_a + (1 - lam) * ce_b)
    assert float(ce) == pytest.approx(expected.sum() / 2, rel=1e-5)


def test_a_mixing_run_resumes_to_the_uninterrupted_result(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    common = ["--data_dir", data, "--section", "tiny", "--model", "simple_cnn", "--fc_units", "8",
              "--deterministic", "true", "--save_checkpoint_steps", "2", "--mix", "cutmix"]

    def weights(run):
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run))
        # train_seconds is wall time, the one thing a resumed run may not repeat
        return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
                if not n.startswith(("save_counter", "_CHECKPOINTABLE", "state/train_seconds"))}

    straight, resumed, plain = (str(tmp_path / name) for name in ("straight", "resumed", "plain"))
    assert hw2_train.main(common + ["--train_dir", straight, "--max_steps", "4"]) == 0
    assert hw2_train.main(common + ["--train_dir", resumed, "--max_steps", "2"]) == 0
    assert hw2_train.main(common + ["--train_dir", resumed, "--max_steps", "4"]) == 0
    assert hw2_train.main(common[:-2] + ["--train_dir", plain, "--max_steps", "4"]) == 0
    a, b, c = weights(straight), weights(resumed), weights(plain)
    assert a and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[name], c[name]) for name in a if name.startswith("ema/"))  # the mix changed the training
