"""The model zoo: shapes at two input sizes, hand-counted parameters, im2col == native, and a
real two-step training that lowers the loss."""

import numpy as np
import pytest
import tensorflow as tf

import hw2
import hw2_input
import layers
import models
import training
import utils
from helpers import items_of, make_image_folder

NUM_CLASSES = 3


def zoo_cfg(model, **extra):
    """A tiny variant of a zoo model (small widths, small classifier)."""
    overrides = {"model": model, "width": "0.0625", "fc_units": "8", "stem": "3x3", **extra}
    return utils.load_config("tiny", {k: str(v) for k, v in overrides.items()})


@pytest.mark.parametrize("model", models.ZOO)
@pytest.mark.parametrize("size, channels", [(16, 3), (28, 1)])
def test_every_model_builds_at_two_sizes(model, size, channels):
    # The 7x7/2 stem with pooling takes 16 px down to 1x1 at the last stage: still a valid network.
    extra = {"stem": "7x7"} if model == "resnet18" else {}
    cfg = zoo_cfg(model, image_size=size, channels=channels, **extra)
    net = hw2.create_model(cfg, NUM_CLASSES)
    logits = net(tf.zeros([2, size, size, channels]), training=False)
    assert logits.shape == (2, NUM_CLASSES)
    assert layers.set_conv_impl(net, "im2col") > 0  # every conv is one of ours


def trainable_params(net):
    return sum(int(np.prod(v.shape)) for v in net.trainable_variables)


def test_simple_cnn_parameters_match_a_hand_count():
    cfg = zoo_cfg("simple_cnn", image_size=16, norm="none", fc_units=32)
    net = hw2.create_model(cfg, NUM_CLASSES)
    conv1 = 3 * 3 * 3 * 8 + 8
    conv2 = 3 * 3 * 8 * 16 + 16
    fc = (16 // 4) ** 2 * 16 * 32 + 32  # two 2x2 pools: 16 -> 4
    logits = 32 * NUM_CLASSES + NUM_CLASSES
    assert trainable_params(net) == conv1 + conv2 + fc + logits


def test_resnet14_parameters_match_a_hand_count():
    # width 1/16: stages of 4, 8, 16, 32 channels; 1-2-2-1 blocks; batch norm (gamma, beta; no bias).
    cfg = zoo_cfg("resnet14", image_size=16, channels=1)
    net = hw2.create_model(cfg, NUM_CLASSES)

    def conv(k, cin, cout):
        return k * k * cin * cout + 2 * cout

    stem = conv(3, 1, 4)
    stage1 = 2 * conv(3, 4, 4)
    total = stem + stage1
    for cin, cout in ((4, 8), (8, 16)):
        first = conv(3, cin, cout) + conv(3, cout, cout) + conv(1, cin, cout)  # with its projection
        total += first + 2 * conv(3, cout, cout)
    total += conv(3, 16, 32) + conv(3, 32, 32) + conv(1, 16, 32)
    total += 32 * NUM_CLASSES + NUM_CLASSES
    assert trainable_params(net) == total


def test_residual_false_drops_the_projections():
    with_res = trainable_params(hw2.create_model(zoo_cfg("resnet14"), NUM_CLASSES))
    without = trainable_params(hw2.create_model(zoo_cfg("resnet14", residual="false"), NUM_CLASSES))
    projections = sum(1 * 1 * cin * cout + 2 * cout for cin, cout in ((4, 8), (8, 16), (16, 32)))
    assert with_res - without == projections


@pytest.mark.parametrize("model, norm", [("cifar10_tutorial", "none"), ("resnet14", "batch"),
                                         ("vgg10", "instance"), ("simple_cnn", "batch")])
def test_im2col_and_native_give_the_same_logits(model, norm):
    extra = {"stem": "7x7"} if model == "resnet14" else {}  # strided 7x7 and 1x1/2 projections
    cfg = zoo_cfg(model, image_size=20, norm=norm, **extra)
    net = hw2.create_model(cfg, NUM_CLASSES)
    images = tf.random.stateless_normal([3, 20, 20, 3], seed=[1, 2])
    ours = net(images, training=False)
    layers.set_conv_impl(net, "native")
    native = net(images, training=False)
    np.testing.assert_allclose(ours.numpy(), native.numpy(), rtol=1e-4, atol=1e-4)


def write_folder(root, per_class=8):
    data_dir = make_image_folder(root, classes=("0", "1", "2"), per_class=per_class, sizes=((20, 20),), noise=15)
    return data_dir, items_of(data_dir)


@pytest.mark.parametrize("model, channels", [("simple_cnn", 1), ("resnet14", 3), ("vgg10", 3)])
def test_two_steps_on_a_tiny_folder_lower_the_loss(tmp_path, model, channels):
    data_dir, items = write_folder(tmp_path)
    cfg = zoo_cfg(model, channels=channels, learning_rate=0.01, weight_decay=0.0)
    strategy = tf.distribute.get_strategy()
    batch = next(iter(hw2_input.train_dataset(data_dir, items, cfg, 12)))
    assert batch[0].shape == (12, 16, 16, channels)
    state = training.create_train_state(utils.Config({**cfg, "precision": "fp32"}), NUM_CLASSES, strategy)
    net = state.model
    step = hw2.make_train_step(net, state.optimizer, state.ema, strategy, 12)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())

    def loss_now():
        return float(hw2.loss(net(batch[0], training=True), batch[1], net, 12)[1])

    before = loss_now()
    step(iterator)
    step(iterator)
    assert loss_now() < before


def test_label_smoothing_matches_the_formula():
    logits = tf.constant([[2.0, 0.0, -1.0]])
    labels = tf.constant([0])
    net = hw2.create_model(zoo_cfg("simple_cnn"), NUM_CLASSES)  # any model without L2
    eps = 0.3
    targets = np.array([1 - eps + eps / 3, eps / 3, eps / 3])
    expected = -(targets * tf.nn.log_softmax(logits)[0].numpy()).sum()
    _, ce = hw2.loss(logits, labels, net, 1, label_smoothing=eps)
    assert float(ce) == pytest.approx(expected, rel=1e-5)


def test_class_weights_scale_each_examples_cross_entropy(tmp_path, caplog):
    """--class_balance weights: the loss of a known batch, and the weights the loop computes and logs."""
    import hw2_dataset
    logits = tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0]])
    labels = tf.constant([0, 1, 2, 1])
    weights = np.array([0.5, 2.0, 0.5], np.float32)
    net = hw2.create_model(zoo_cfg("simple_cnn", weight_decay=0.0), NUM_CLASSES)
    per_example = -tf.nn.log_softmax(logits).numpy()[np.arange(4), labels.numpy()]
    _, ce = hw2.loss(logits, labels, net, 4, class_weights=weights)
    assert float(ce) == pytest.approx((weights[labels.numpy()] * per_example).sum() / 4, rel=1e-6)
    # 9, 3 and 1 images: weights 1/n normalised to mean 1 over the classes
    items = [(f"{c}/{i}.png", c) for c, n in enumerate((9, 3, 1)) for i in range(n)]
    w = hw2_dataset.class_weights(items, 3)
    assert w.mean() == pytest.approx(1.0) and w[0] * 9 == pytest.approx(w[1] * 3) == pytest.approx(w[2] * 1)


def test_settings_a_model_ignores_are_named():
    simple = models.ignored_settings(zoo_cfg("simple_cnn"))  # width 1/16 and stem 3x3 set: not read
    assert {"stem=3x3", "width=0.0625", "dense_units=8"} <= set(simple)  # and [tiny]'s seed-network widths
    assert not [s for s in simple if s.startswith(("fc_units", "norm", "dropout"))]
    resnet = models.ignored_settings(zoo_cfg("resnet14"))
    assert "fc_units=8" in resnet and not [s for s in resnet if s.startswith(("width", "stem"))]
    assert models.ignored_settings(utils.load_config("tiny")) == []


def test_moving_average_warms_up_as_tensorflow_num_updates():
    """decay = min(ema_decay, (1 + n) / (10 + n)): short runs are not judged on initial weights."""
    net = hw2.create_model(zoo_cfg("simple_cnn"), NUM_CLASSES)
    ema = hw2.EMA(net, 0.999)
    v = net.trainable_variables[0]
    shadow = v.numpy().copy()
    for n, new in [(1, 1.0), (2, -2.0), (50, 3.0), (5000, 0.5)]:
        v.assign(tf.fill(v.shape, new))
        ema.update(tf.constant(n))
        decay = min(0.999, (1 + n) / (10 + n))
        shadow = decay * shadow + (1 - decay) * new
        np.testing.assert_allclose(ema.shadow[0].numpy(), shadow, rtol=1e-5, atol=1e-6)


def test_moving_average_covers_batch_norm_statistics():
    net = hw2.create_model(zoo_cfg("simple_cnn"), NUM_CLASSES)
    ema = hw2.EMA(net, 0.5)
    stats = [v for v in net.non_trainable_variables if v.path.endswith("moving_mean")]
    assert stats and len(ema.stats_shadow) == 2 * len(stats)
    stats[0].assign(tf.fill(stats[0].shape, 4.0))
    ema.update(tf.constant(10_000))  # decay 0.5: halfway from the initial 0 to 4
    ema.swap()
    np.testing.assert_allclose(stats[0].numpy(), 2.0)
    ema.swap()
    np.testing.assert_allclose(stats[0].numpy(), 4.0)


def test_batch_norm_statistics_warm_up_like_the_moving_average(tmp_path):
    """The n-th train step moves every batch-norm statistic min(0.99, (1 + n) / (10 + n)) of the
    way to the batch's (Keras: always 0.99, so 150 steps still held 22% of the initial 0 and 1).
    Checked on the seed network's first layer, whose batch statistics are those of a convolution
    of the batch itself; from step ~900 on it is Keras' own update."""
    data_dir, items = write_folder(tmp_path)
    cfg = utils.Config({**utils.load_config("tiny"), "precision": "fp32", "weight_decay": 0.0})
    strategy = tf.distribute.get_strategy()
    images, labels = next(iter(hw2_input.train_dataset(data_dir, items, cfg, 12)))
    state = training.create_train_state(cfg, NUM_CLASSES, strategy)
    net, optimizer = state.model, state.optimizer
    stats = hw2.batch_norm_statistics(net)
    assert len(hw2.StatisticsWarmUp(net)._pairs) == len(stats) > 2  # the dense layer's Keras BN too
    first = next(l for l in net._flatten_layers() if isinstance(l, layers.ConvBNReLU) and l.kernel.shape[2] == 3)
    step = hw2.make_train_step(net, optimizer, state.ema, strategy, 12)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    for n in (0, 1, 2, 5000):
        optimizer.iterations.assign(n)
        y = tf.nn.conv2d(images, first.kernel, first.stride, first.padding)
        mean, variance = (t.numpy() for t in tf.nn.moments(y, [0, 1, 2]))
        old_mean, old_variance = first.bn.moving_mean.numpy(), first.bn.moving_variance.numpy()
        step(iterator)
        m = min(0.99, (1 + n) / (10 + n))
        np.testing.assert_allclose(first.bn.moving_mean.numpy(), m * old_mean + (1 - m) * mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(first.bn.moving_variance.numpy(), m * old_variance + (1 - m) * variance,
                                   rtol=1e-4, atol=1e-5)
