"""What every hw2 script shares: the model (`create_model`, `inference`), `loss`, the weight
moving average (`EMA`) and the compiled train and eval steps.

Training (training.py), evaluation (evaluation.py), export and prediction (serving.py) all go
through `inference`, so a checkpoint scores the same number everywhere.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

import mixing
import models
import pool_forms
from layers import ConvBNReLU, ConvStack, InceptionModule, spatial_dropout


class HW2Net(keras.Model):
    """The seed network: conv stack, strided conv, two inception modules, dense, logits.

    At the default 100x100 input: 100x100x64 -> 50x50x128 -> pool 25x25x128 -> inception2
    25x25x320 -> pool 13x13x320 -> inception3 13x13x192 -> pool 7x7x192 -> dense 256 -> logits.
    """

    def __init__(self, cfg: Mapping, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        impl, dense_wd = cfg["conv_impl"], cfg["weight_decay"]
        # l2_on = dense is the seed's choice: L2 on the dense layer only.
        wd = dense_wd if cfg["l2_on"] == "all" else 0.0
        self.num_classes = num_classes
        self.conv_stack1 = ConvStack(list(cfg["conv_stack"]), 3, conv_impl=impl,
                                     weight_decay=wd, name="conv_stack1")
        self.conv2 = ConvBNReLU(cfg["conv2"], 3, stride=2, conv_impl=impl, weight_decay=wd, name="conv2")
        # 3x3/2 SAME pooling as in the CIFAR-10 tutorial: 50 -> 25 -> 13 -> 7.
        self.pool1 = pool_forms.MaxPool2D(3, 2, padding="same", name="pool1")
        self.inception2 = InceptionModule(cfg["inception_version"], tuple(cfg["inception2"]),
                                          cfg["inception2_bottleneck"], conv_impl=impl,
                                          weight_decay=wd, name="inception2")
        self.pool2 = pool_forms.MaxPool2D(3, 2, padding="same", name="pool2")
        self.drop2 = spatial_dropout(cfg["keep_prob_1"])
        self.inception3 = InceptionModule(cfg["inception_version"], tuple(cfg["inception3"]),
                                          cfg["inception3_bottleneck"], conv_impl=impl,
                                          weight_decay=wd, name="inception3")
        self.pool3 = pool_forms.MaxPool2D(3, 2, padding="same", name="pool3")
        self.drop3 = spatial_dropout(cfg["keep_prob_2"])
        self.flatten = keras.layers.Flatten()
        self.dense1 = keras.layers.Dense(cfg["dense_units"], use_bias=False, name="dense1",
                                         kernel_initializer="he_normal",
                                         kernel_regularizer=keras.regularizers.L2(dense_wd) if dense_wd else None)
        self.dense1_bn = keras.layers.BatchNormalization(name="dense1_bn")
        self.drop_dense = keras.layers.Dropout(1.0 - cfg["keep_prob_dense"])
        self.logits = keras.layers.Dense(num_classes, name="softmax_linear", dtype="float32")

    def call(self, images, training=False):
        stack = self.conv_stack1(images, training=training)
        conv2 = self.conv2(stack, training=training)
        inception2 = self.inception2(self.pool1(conv2), training=training)
        x = self.drop2(self.pool2(inception2), training=training)
        inception3 = self.inception3(x, training=training)
        x = self.drop3(self.pool3(inception3), training=training)
        dense1 = tf.nn.relu(self.dense1_bn(self.dense1(self.flatten(x)), training=training))
        # Each stage's output, for the activation histograms (make_summary_step).
        self.taps = {"conv_stack1": stack, "conv2": conv2, "inception2": inception2, "inception3": inception3,
                     "dense1": dense1}
        return self.logits(self.drop_dense(dense1, training=training))


_HISTOGRAM_METADATA = histogram_metadata.create_summary_metadata(display_name=None, description=None)

MODELS = ("hw2_inception",) + models.ZOO  # config key `model`


def create_model(cfg: Mapping, num_classes: int) -> keras.Model:
    """The network cfg["model"] names, with its variables created (before any checkpoint restore)."""
    if cfg["optimizer"] == "adamw":
        # AdamW decays the kernels itself (make_optimizer): an L2 term in the loss as well would
        # decay them twice, once through Adam's per-weight step scaling, which is what AdamW avoids.
        cfg = {**cfg, "weight_decay": 0.0}
    model = HW2Net(cfg, num_classes) if cfg["model"] == "hw2_inception" else models.create(cfg, num_classes)
    model(tf.zeros([1, cfg["image_size"], cfg["image_size"], cfg["channels"]]), training=False)
    return model


def synchronize_batch_norm(model: keras.Model) -> None:
    """Batch-norm statistics over the global batch: Keras reads `synchronized` at call time, and
    bn_forms.batch_norm hands synchronized layers back to Keras' all-reducing path."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def variables_by_path(model: keras.Model) -> dict:
    """Every model variable keyed by its layer path, for tf.train.Checkpoint.

    tf.train.Checkpoint(model=keras_model) silently skips Keras 3 layers held in Python lists
    (our conv stack and inception towers): their weights and batch-norm statistics were missing
    from checkpoints. Keying variables by path saves all of them, and a checkpoint of another
    network fails to match loudly. The model's own name (hw2_net, hw2_net_1, ...) is dropped.
    """
    out = {}
    for v in model.variables:
        key = v.path.split("/", 1)[-1]
        while key in out:  # e.g. each dropout layer's seed_generator_state
            key += "+"
        out[key] = v
    return out


def inference(model: keras.Model, images: tf.Tensor, training: bool = False) -> tf.Tensor:
    """float32 logits of `images` (computed in the model's precision)."""
    return tf.cast(model(images, training=training), tf.float32)


def _targets(labels: tf.Tensor, num_classes: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """(1 - eps) * one_hot + eps / num_classes."""
    return tf.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / tf.cast(
        num_classes, tf.float32)


def loss(logits: tf.Tensor, labels: tf.Tensor, model: keras.Model, global_batch_size: int,
         label_smoothing: float = 0.0, class_weights=None, mix=None) -> tuple[tf.Tensor, tf.Tensor]:
    """Softmax cross-entropy averaged over the global batch + L2 shared out over replicas.

    `class_weights` [classes] (mean 1, from --class_balance weights) scale each example's
    cross-entropy by its label's weight. `mix` = (partner_labels, lam) from mixing.mix_batch: the
    target (and the weight) is lam * the label's + (1 - lam) * the partner's. Returns (total,
    cross_entropy). Summing each replica's total across replicas gives the true global loss, which
    is what tf.distribute's gradient all-reduce expects.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    partner, lam = mix if mix is not None else (None, None)
    if mix is not None or label_smoothing > 0:
        targets = _targets(labels, num_classes, label_smoothing)
        if mix is not None:
            targets = lam * targets + (1.0 - lam) * _targets(partner, num_classes, label_smoothing)
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    else:
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if class_weights is not None:
        weights = tf.cast(class_weights, tf.float32)
        weight = tf.gather(weights, labels)
        if mix is not None:
            weight = lam * weight + (1.0 - lam) * tf.gather(weights, partner)
        per_example *= weight
    ce = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
    l2 = tf.nn.scale_regularization_loss(tf.add_n(model.losses)) if model.losses else 0.0
    return ce + l2, ce


def count_correct(logits: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    """Number of examples whose label is among the k classes `tf.math.top_k` ranks first.

    Not `tf.math.in_top_k`: it counts every class tied at the k-th logit as inside, so a model
    whose logits are all equal would score top-1 1.0. top_k breaks ties by the lower index, as
    argmax does, so top-1 here is the accuracy of the per-class report's predictions.
    """
    top = tf.math.top_k(tf.cast(logits, tf.float32), k=k).indices
    hit = tf.reduce_any(tf.equal(top, tf.cast(labels, tf.int32)[:, tf.newaxis]), axis=1)
    return tf.reduce_sum(tf.cast(hit, tf.float32))


def batch_norm_statistics(model: keras.Model) -> list:
    """The batch-norm layers' moving means and variances (ours and Keras')."""
    return [v for v in model.non_trainable_variables if v.path.endswith(("moving_mean", "moving_variance"))]


class EMA:
    """Exponential moving average of the trainable weights and of the batch-norm statistics,
    swapped in for validation.

    The statistics are averaged with the same decay so that the averaged weights are evaluated
    with statistics of the same horizon, not those of the last ~100 steps of the raw model.
    A plain object on purpose: only `shadow` and `stats_shadow` go into checkpoints, so the
    model's own variables are not saved twice.
    """

    def __init__(self, model: keras.Model, decay: float):
        self.decay = decay
        self._vars = list(model.trainable_variables)
        self.shadow = [tf.Variable(v.value, trainable=False, name="ema") for v in self._vars]
        self._stats = batch_norm_statistics(model)
        self.stats_shadow = [tf.Variable(v.value, trainable=False, name="ema_stats") for v in self._stats]
        # One graph: ~90 eager assigns each way took ~65 ms a validation.
        self._swap = tf.function(self._swap_all, autograph=False)

    def update(self, step: tf.Tensor) -> None:
        # Warm-up as in tf.train.ExponentialMovingAverage(num_updates): early on the average
        # follows the weights closely, so short runs are not judged on near-initial weights.
        step = tf.cast(step, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + step) / (10.0 + step))
        for s, v in self._pairs():
            s.assign(decay * s + (1.0 - decay) * tf.cast(v.value, s.dtype))

    def _pairs(self, stats: bool = True):
        return list(zip(self.shadow, self._vars)) + (list(zip(self.stats_shadow, self._stats)) if stats else [])

    def copy_to_model(self, stats: bool = True) -> None:
        """Put the averages into the model (eval, export): the raw values stay in the checkpoint.
        stats=False keeps the model's own batch-norm statistics (a checkpoint without averages)."""
        for s, v in self._pairs(stats):
            v.assign(s)

    def swap(self) -> None:
        """Exchange live and averaged values (call again to swap back)."""
        self._swap()

    def _swap_all(self) -> None:
        for s, v in self._pairs():
            tmp = tf.identity(v.value)
            v.assign(s)
            s.assign(tmp)


class _FusedAdamStep:
    """Keras' Adam update with each variable's step in one TensorFlow kernel (ResourceApplyAdam):
    8 ops a variable where Keras builds 28, each a launch. At the photo defaults (64 px, batch 16,
    ~100 ms steps) the optimizer and EMA took 9-10 ms of op time a step, 6.5 with it (bench/README).
    The same formula: m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps). AdamW's decay stays Keras' own
    (applied before this). amsgrad and sparse gradients take Keras' path."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


class FusedAdam(_FusedAdamStep, keras.optimizers.Adam):
    pass


class FusedAdamW(_FusedAdamStep, keras.optimizers.AdamW):
    pass


def make_optimizer(cfg: Mapping, model: keras.Model) -> keras.optimizers.Optimizer:
    if cfg["optimizer"] == "sgd":
        opt = keras.optimizers.SGD(cfg["learning_rate"], momentum=cfg["momentum"],
                                   nesterov=cfg["nesterov"])
    elif cfg["optimizer"] == "adamw":
        # Decoupled weight decay (Loshchilov & Hutter 2019): each step multiplies a kernel by
        # 1 - weight_decay * lr, apart from Adam's normalized step. Kernels only, as timm does:
        # biases and batch-norm scales and offsets (1-D) are left alone, as L2 leaves them.
        if cfg["weight_decay"] < 0.01:
            logging.warning("optimizer adamw with weight_decay %g scales the kernels by only 1 - %.1e a step; "
                            "decoupled decay wants ~0.05-1 (--weight_decay 0.5)", cfg["weight_decay"],
                            cfg["weight_decay"] * cfg["learning_rate"])
        opt = FusedAdamW(cfg["learning_rate"], weight_decay=cfg["weight_decay"])
        opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables
                                                if not _decayed(v, cfg["l2_on"])])
    else:
        opt = FusedAdam(cfg["learning_rate"])
    if model.dtype_policy.compute_dtype == "float16":
        # fp16 gradients underflow without loss scaling (make_train_step calls scale_loss).
        opt = keras.optimizers.LossScaleOptimizer(opt)
    # Slots must exist before a tf.distribute step runs (and before a restore fills them).
    opt.build(model.trainable_variables)
    return opt


def _decayed(variable, l2_on: str) -> bool:
    """Whether AdamW decays this variable: every kernel, or the dense kernels only (l2_on = dense)."""
    return len(variable.shape) == 2 or (len(variable.shape) > 2 and l2_on == "all")


class StatisticsWarmUp:
    """Batch-norm moving statistics warmed up as the EMA's weights are: the n-th update (n from 0)
    moves them min(momentum, (1 + n) / (10 + n)) of the way, not Keras' fixed momentum.

    Keras starts them at mean 0 and variance 1 and moves them 1 - momentum (0.01) of the way to
    each batch's: 150 steps left 22% of those initial values, and a tiny digits run evaluated
    with them scored chance (val top-1 0.35-0.37 where the warmed-up statistics gave 0.88-0.95),
    as did every first validation of a run. Applied after the step to whichever path updated
    them (ours, Keras' for dense and synchronized layers): a step from `old` to `new` at momentum
    m took the batch's value b = (new - m old) / (1 - m), and m' instead gives
    old + (new - old) (1 - m') / (1 - m). After ~900 steps m' = m and this changes nothing.
    """

    def __init__(self, model: keras.Model):
        self._pairs = [(v, float(layer.momentum)) for layer in model._flatten_layers()
                       if isinstance(layer, keras.layers.BatchNormalization) and layer.momentum < 1.0
                       for v in (layer.moving_mean, layer.moving_variance)]

    def before(self) -> list[tf.Tensor]:
        return [tf.identity(v.value) for v, _ in self._pairs]

    def after(self, old: list[tf.Tensor], step: tf.Tensor) -> None:
        n = tf.cast(step, tf.float32)
        for (v, m), o in zip(self._pairs, old):
            scale = (1.0 - tf.minimum(m, (1.0 + n) / (10.0 + n))) / (1.0 - m)
            v.assign(o + (v.value - o) * scale)


def sharpness_aware(model: keras.Model, grads: list, rho: float, images, labels, mixed, global_batch_size: int,
                    label_smoothing: float, class_weights, optimizer) -> list:
    """Sharpness-aware minimization (Foret et al. 2021): the weights step by rho along the
    normalized gradient, to about the highest loss within rho of them, and the gradient taken
    there replaces the plain one: a step toward minima whose neighbourhood is low too, which
    generalize better where a network can memorize its training images. The weights and the
    batch-norm moving statistics are back as they were before the caller applies the update.
    One replica only: the perturbation is this replica's own (training.py refuses several)."""
    variables = model.trainable_variables
    norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in grads])
    scale = rho / (norm + 1e-12)
    steps = [tf.cast(g, v.dtype) * tf.cast(scale, v.dtype) for g, v in zip(grads, variables)]
    stats = batch_norm_statistics(model)
    kept = [tf.identity(v.value) for v in variables + stats]  # exact: w + e - e drifts by round-off
    for v, e in zip(variables, steps):
        v.assign_add(e)
    with tf.GradientTape() as tape:
        logits = inference(model, images, training=True)
        total, _ = loss(logits, labels, model, global_batch_size, label_smoothing, class_weights, mixed)
        scaled = optimizer.scale_loss(total)
    sharp = tape.gradient(scaled, variables)
    for v, k in zip(variables + stats, kept):  # the statistics count each batch once
        v.assign(k)
    return sharp


def make_train_step(model: keras.Model, optimizer, ema: EMA, strategy: tf.distribute.Strategy,
                    global_batch_size: int, label_smoothing: float = 0.0, class_weights=None,
                    mix: tuple = ("none", 0.0, 0), sam_rho: float = 0.0) -> Callable:
    """The train step: next batch from a distributed iterator -> forward, loss, gradients, update,
    moving average; returns the global (loss, cross-entropy, top-1 correct).
    `mix` = (mode, alpha, seed): mixing.mix_batch on each replica's batch, drawn from (seed, step).
    `sam_rho` > 0: the update uses the gradient at the batch's sharpest nearby point
    (`sharpness_aware`), one more forward and backward pass a step."""
    mode, alpha, seed = mix
    warm_up = StatisticsWarmUp(model)

    def replica_step(images, labels, step):
        mixed = None
        if mode != "none":
            images, partner, lam = mixing.mix_batch(images, labels, mode, alpha,
                                                    tf.stack([tf.constant(seed, tf.int64), step]))
            mixed = (partner, lam)
        with tf.GradientTape() as tape:
            logits = inference(model, images, training=True)
            total, ce = loss(logits, labels, model, global_batch_size, label_smoothing, class_weights, mixed)
            scaled = optimizer.scale_loss(total)  # total itself unless fp16 loss scaling is on
        grads = tape.gradient(scaled, model.trainable_variables)
        if sam_rho > 0:
            grads = sharpness_aware(model, grads, sam_rho, images, labels, mixed, global_batch_size,
                                    label_smoothing, class_weights, optimizer)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        # Mixed: counted against each example's own label, the larger part of its mix (lam >= 0.5).
        return total, ce, count_correct(logits, labels, 1)

    @tf.function(autograph=False)  # no Python control flow on tensors; saves seconds of conversion per trace
    def train_step(iterator):
        images, labels = next(iterator)
        step = tf.cast(tf.identity(optimizer.iterations), tf.int64)
        old = warm_up.before()  # program order: read before the forward pass moves them
        total, ce, correct = strategy.run(replica_step, args=(images, labels, step))
        warm_up.after(old, step)
        ema.update(optimizer.iterations)
        return tuple(strategy.reduce("SUM", t, axis=None) for t in (total, ce, correct))

    return train_step


def make_summary_step(model: keras.Model, writer, batch_size: int, label_smoothing: float = 0.0) -> Callable:
    """summary_step(images, labels, step): TensorBoard histograms of the weights, of the gradients
    and of each stage's activations (with its zero fraction), as the CIFAR-10 tutorial wrote them,
    computed in training mode on a fixed batch. It changes nothing: batch-norm statistics and
    dropout seed states that the forward pass moves are put back."""

    @tf.function(autograph=False)
    def values(images, labels):
        kept = [tf.identity(v) for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            logits = inference(model, images, training=True)
            total, _ = loss(logits, labels, model, batch_size, label_smoothing)
        grads = tape.gradient(total, model.trainable_variables)
        activations = {name: tf.identity(x) for name, x in getattr(model, "taps", {}).items()}
        for v, value in zip(model.non_trainable_variables, kept):  # after the above: program order
            v.assign(value)
        return grads, activations

    def summary_step(images, labels, step):
        # Histograms are bucketed from the values in numpy (write_histogram): inside the graph
        # their ~30 ops each made the first call take 13 s to trace and optimize.
        grads, activations = values(images, labels)
        with writer.as_default(step=int(step)):
            for v, g in zip(model.trainable_variables, grads):
                write_histogram(f"weights/{v.path}", v.numpy())
                if g is not None:
                    write_histogram(f"gradients/{v.path}", g.numpy())
            for name, x in activations.items():
                x = tf.cast(x, tf.float32).numpy()
                write_histogram(f"activations/{name}", x)
                tf.summary.scalar(f"activations/{name}/zero_fraction", float((x == 0).mean()))

    return summary_step


def write_histogram(name: str, values: np.ndarray, buckets: int = 30) -> None:
    """tf.summary.histogram(name, values) to the default writer, its buckets counted in numpy.

    TensorBoard's own bucketing one-hots every value into a [values, buckets] float64 matrix
    with eager ops: 2.1 s for the seed network's 111 histograms at 64 px, so at the photo defaults
    each summary step (every 100 steps) cost 3.4 s and the histograms took 18% of a budgeted run
    (bench/epoch_parts.py). The same buckets: `buckets` equal widths from min to max, the maximum
    in the last; all values equal, edges at that value and every count in the last bucket.
    """
    x = np.asarray(values, np.float64).ravel()
    if not x.size:
        table = np.zeros([buckets, 3])
    elif x.min() == x.max():
        table = np.stack([np.full(buckets, x.max()), np.full(buckets, x.max()),
                          np.eye(buckets)[-1] * x.size], axis=1)
    else:
        lo, hi = x.min(), x.max()
        index = np.minimum(np.floor((x - lo) / ((hi - lo) / buckets)).astype(np.int64), buckets - 1)
        edges = np.linspace(lo, hi, buckets + 1)
        edges[-1] = hi
        table = np.stack([edges[:-1], edges[1:], np.bincount(index, minlength=buckets)], axis=1)
    tf.summary.write(name, tf.constant(table, tf.float64), metadata=_HISTOGRAM_METADATA)


def make_eval_step(model: keras.Model, strategy: tf.distribute.Strategy, top_k: int) -> Callable:
    """A compiled step: a batch -> global sums of (cross-entropy, top-1 correct, top-k correct, n)."""

    def replica_step(images, labels):
        logits = inference(model, images)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        n = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.reduce_sum(ce), count_correct(logits, labels, 1), count_correct(logits, labels, top_k), n

    @tf.function(autograph=False)
    def eval_step(batch):
        out = strategy.run(replica_step, args=batch)
        return tuple(strategy.reduce("SUM", t, axis=None) for t in out)

    return eval_step


def evaluate(eval_step: Callable, batches) -> dict:
    """Run every batch of `batches` (distributed batches: one pass over a set) once; returns
    loss, top1, topk, n over the whole set."""
    sums = [0.0, 0.0, 0.0, 0.0]
    for batch in batches:
        for i, t in enumerate(eval_step(batch)):
            sums[i] += float(t)
    ce, c1, ck, n = sums
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "topk": float("nan"), "n": 0}
    return {"loss": ce / n, "top1": c1 / n, "topk": ck / n, "n": int(n)}
