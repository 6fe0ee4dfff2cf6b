"""The forms our convolution can take: the values and gradients of tf.nn.conv2d, computed with
matmuls and gathers of our own, each fastest on some layer shapes.

    gather    im2col: one gather of the kh*kw taps into a patch matrix, one matmul. Any shape.
              It reads x itself, not a padded copy, except on small maps (see _GatherPlan).
    pairs     stride-1 layers with few input channels (the stem): the gather form on pixel pairs,
              each patch row two neighbouring outputs' window, so the gather copies a third as
              many rows, twice as long; (kw + 1) / kw the multiplies (the stem's 3x3 on RGB at
              batch 128: the patch gather 16-20 ms against 41-58, the layer 73-112 against 87-135).
    matmul    1x1 kernels: the (subsampled) input is the patch matrix, no gather.
    winograd  F(4x4, 3x3) and F(4x4, 5x5) (Lavin & Gray 2016) for 3x3 and 5x5 stride-1 float32
              layers: 36 (64) tile products per 4x4 outputs instead of 144 (400) multiplies, in
              four matmuls and two gathers. In 16-bit floats, 3x3 layers only, on 4x4 tiles:
              F(2x2, 3x3), 16 products per 2x2 outputs instead of 36 (see tile_side).
    winograd_s2  3x3 stride-2 float32 layers: the input's four stride phases read as the channels
              of a half-size image (space to depth, folded into the tile gather), on which the
              layer is a 2x2 stride-1 convolution with 4*Cin channels, computed by F(5x5, 2x2):
              36 tile products of 4*Cin per 25 outputs where the direct form does 25 * 9 of Cin
              (1.56x fewer multiplies; on the seed network's conv2 under an AVX2 cap, 9% faster).

A strided layer's input gradient (the gather and winograd_s2 forms) is col2im on a CPU: one
wide matmul for every tap's product, added into the input pixels by an XLA-compiled overlap-add
(`col2im_input_grad`); elsewhere, and for small layers, one matmul per stride phase.

`conv2d(x, w, sh, sw, same, form)` runs one form with its hand-written gradient (training);
`conv2d_bias_act` is the inference form with the bias (a folded batch norm) and ReLU fused where
the form allows. `default_form` is the fixed choice per shape (tests, --deterministic); the
autotune in conv_autotune.py picks by measurement among `applicable_forms`. No form calls
TensorFlow's own convolution.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

FORMS = ("gather", "matmul", "winograd", "winograd_s2", "pairs")

# The pairs form's gather copies 2 * Cin-long rows: worth it while a pixel is a short copy.
PAIRS_MAX_CIN = 16


class ConvSpec(NamedTuple):
    """What decides a form's speed: the layer's shape (batch aside), stride, padding and dtype."""
    h: int
    w: int
    cin: int
    cout: int
    kh: int
    kw: int
    sh: int
    sw: int
    same: bool
    dtype: str  # compute dtype name: float32, bfloat16, float16

    def key(self) -> str:
        """A compact, stable text key (autotune cache)."""
        pad = "same" if self.same else "valid"
        return (f"{self.h}x{self.w}x{self.cin}-{self.kh}x{self.kw}/{self.sh}x{self.sw}-{pad}"
                f"-{self.cout}-{self.dtype}")


def spec_of(x: tf.Tensor, w: tf.Tensor, sh: int, sw: int, same: bool) -> ConvSpec:
    _, h, wd, cin = x.shape
    if h is None or wd is None or cin is None:
        raise ValueError(f"our convolution needs static height, width and channels, got shape {x.shape}")
    kh, kw, _, cout = w.shape
    return ConvSpec(int(h), int(wd), int(cin), int(cout), int(kh), int(kw), sh, sw, same, x.dtype.name)


def applicable_forms(spec: ConvSpec) -> tuple[str, ...]:
    """The forms that compute this layer (gather always does)."""
    forms = ["gather"]
    if spec.kh == spec.kw == 1:
        forms.append("matmul")
    if spec.sh == spec.sw == 1 and (spec.kh == spec.kw == 3 or (spec.kh == spec.kw == 5 and spec.dtype == "float32")):
        # Winograd's transforms add rounding error: fine in float32 (tested to 1e-4 of tf.nn.conv2d);
        # in 16-bit floats only on the small tiles of 3x3 kernels (tile_side).
        forms.append("winograd")
    if spec.kh == spec.kw == 3 and spec.sh == spec.sw == 2 and spec.dtype == "float32":
        forms.append("winograd_s2")
    if spec.sh == spec.sw == 1 and spec.kw > 1 and spec.cin <= PAIRS_MAX_CIN and _even_out_width(spec):
        forms.append("pairs")
    return tuple(forms)


def _even_out_width(spec: ConvSpec) -> bool:
    """Whether the output width is even (False where a VALID kernel does not fit)."""
    return (spec.same or spec.w >= spec.kw) and axis_plan(spec.w, spec.kw, spec.sw, spec.same)[0] % 2 == 0


def default_form(spec: ConvSpec, training: bool = True) -> str:
    """The fixed form for a layer shape when nothing was tuned (tests, --deterministic true).

    From bench/conv_speed.py on a Zen 5 with and without ONEDNN_MAX_CPU_ISA=AVX2: 1x1 kernels as
    plain matmuls; Winograd for 3x3 and 5x5 stride-1 float32 layers with at least 16 input channels
    (with fewer, the GEMM is too thin for its transforms to pay); the gather everywhere else.
    """
    forms = applicable_forms(spec)
    if "matmul" in forms:
        return "matmul"
    if "winograd" in forms and spec.cin >= 16:
        return "winograd"
    return "gather"


def conv2d(x: tf.Tensor, w: tf.Tensor, sh: int, sw: int, same: bool, form: str) -> tf.Tensor:
    """Convolution of x [N,H,W,Cin] by w [kh,kw,Cin,Cout] (both in the compute dtype) in `form`."""
    spec = spec_of(x, w, sh, sw, same)
    if form not in applicable_forms(spec):
        raise ValueError(f"conv form {form!r} cannot compute {spec.key()}; "
                         f"it can be {', '.join(applicable_forms(spec))}")
    if form == "matmul":
        return _matmul_conv(x, w, sh, sw, same)
    if form == "winograd":
        return _winograd_conv(x, w, same)
    if form == "winograd_s2":
        return _winograd_s2_conv(x, w, same)
    if form == "pairs":
        return _pairs_conv(x, w, same)
    return _gather_conv(x, w, sh, sw, same)


def conv2d_bias_act(x: tf.Tensor, w: tf.Tensor, bias: tf.Tensor, sh: int, sw: int, same: bool, form: str,
                    relu: bool) -> tf.Tensor:
    """relu(conv2d(x, w) + bias) for inference (no hand-written gradient: autodiff still works).

    The gather and matmul forms end in MatMul -> BiasAdd -> Relu on the patch matrix, the pattern
    Grappler fuses into one oneDNN matmul; Winograd adds the bias after its output gather.
    """
    spec = spec_of(x, w, sh, sw, same)
    if form not in applicable_forms(spec):
        raise ValueError(f"conv form {form!r} cannot compute {spec.key()}")
    if form in ("winograd", "winograd_s2"):
        y = tf.nn.bias_add(conv2d(x, w, sh, sw, same, form), bias)
        return tf.nn.relu(y) if relu else y
    if form == "pairs":
        src, (_, _, _, ho, wo, _, _) = _pair_source(x, spec.kh, spec.kw, same)
        y = tf.nn.bias_add(tf.matmul(_pair_cols(src, spec.kh, spec.kw, ho, wo), _pair_kernel(w)), tf.tile(bias, [2]))
        return tf.reshape(tf.nn.relu(y) if relu else y, [-1, ho, wo, spec.cout])
    def epilogue(y):
        y = tf.nn.bias_add(y, bias)
        return tf.nn.relu(y) if relu else y

    if form == "matmul":
        xs = _subsample(x, sh, sw, same)
        y = epilogue(tf.matmul(tf.reshape(xs, [-1, spec.cin]), tf.reshape(w, [-1, spec.cout])))
        return tf.reshape(y, [-1, xs.shape[1], xs.shape[2], spec.cout])
    plan = _gather_plan(spec.h, spec.w, spec.kh, spec.kw, sh, sw, same)
    return _gather_matmul(_source(x, plan), plan, spec.kh * spec.kw, tf.reshape(w, [-1, spec.cout]), epilogue)


def _in_backward_scope(grad):
    """grad, building its ops in the name scope gradient_tape/<the forward's scope>/im2col_grad/,
    beside autodiff's own, so that bench/profile_step.py attributes them to their layer."""
    scope = tf.get_current_name_scope()
    name = f"gradient_tape/{scope}/im2col_grad/" if scope else "gradient_tape/im2col_grad/"

    def scoped(dy):
        with tf.name_scope(name):
            return grad(dy)

    return scoped


# ---------------------------------------------------------------------------------------------
# gather (im2col)
# ---------------------------------------------------------------------------------------------


def axis_plan(size: int, k: int, s: int, same: bool) -> tuple[int, int, int]:
    """(out, pad_before, pad_after) for one spatial axis; SAME puts the odd pixel after, like TF."""
    if same:
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
    else:
        out = (size - k) // s + 1
        total = 0
    if out < 1:
        raise ValueError(f"kernel {k} does not fit an input of size {size} with VALID padding")
    return out, total // 2, total - total // 2


class _GatherPlan(NamedTuple):
    """Static indices of the gather form without a padded copy of x (the copy cost conv2 of the
    seed network 14 ms of a 1,075 ms step at batch 64 on an AVX-512 Xeon, and TensorFlow kept it
    alive from the forward pass to the backward one: 167 MB at batch 64).

    Every (output, tap) gathers a pixel of x itself; a tap in the padding gathers pixel 0
    instead, and the few outputs that have one (`border`) are computed again from a small
    gather of the pixels they read (`near`) with a zero row after them."""
    ho: int
    wo: int
    pt: int
    pl: int
    pad: tuple | None       # ((top, bottom), (left, right)) where x is padded after all
    index: np.ndarray       # [ho*wo*kh*kw]: the pixel of x each (output, tap) reads (0: padding)
    border: np.ndarray      # [B]: outputs with a tap in the padding
    near: np.ndarray        # [P]: the pixels of x those outputs read
    near_index: np.ndarray  # [B*kh*kw]: each border (output, tap)'s row of near, P for padding


def _gather_plan(h: int, wd: int, kh: int, kw: int, sh: int, sw: int, same: bool) -> _GatherPlan:
    ho, pt, pb = axis_plan(h, kh, sh, same)
    wo, pl, pr = axis_plan(wd, kw, sw, same)
    oh, ow, i, j = np.meshgrid(*map(np.arange, (ho, wo, kh, kw)), indexing="ij")
    r, c = oh * sh + i - pt, ow * sw + j - pl
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < wd)
    has_pad = ~inside.all(axis=(2, 3))
    none = np.zeros(0, int)
    if has_pad.sum() * 4 > ho * wo:  # mostly border (small maps): one padded copy is cheaper
        index = ((r + pt) * (wd + pl + pr) + c + pl).reshape(-1)
        return _GatherPlan(ho, wo, pt, pl, ((pt, pb), (pl, pr)), index, none, none, none)
    pixel = np.where(inside, r * wd + c, h * wd).reshape(ho * wo, kh * kw)
    _, border, near, near_index = _split_border(pixel, h * wd)
    return _GatherPlan(ho, wo, pt, pl, None, np.where(pixel < h * wd, pixel, 0).reshape(-1), border, near,
                       near_index)


def _source(x: tf.Tensor, plan: _GatherPlan) -> tf.Tensor:
    """What the plan's index reads: x (padded if the plan says so) as [N, pixels, C]."""
    if plan.pad:
        x = tf.pad(x, [[0, 0], *plan.pad, [0, 0]])
    return tf.reshape(x, [-1, x.shape[1] * x.shape[2], x.shape[3]])


def _gather_rows(x_rows: tf.Tensor, index: np.ndarray, k: int) -> tf.Tensor:
    """[N * len(index) / k, k * C]: x_rows [N, pixels, C] gathered along the pixels."""
    if k == 1 and np.array_equal(index, np.arange(x_rows.shape[1])):  # a 1x1 stride-1 kernel: x itself
        return tf.reshape(x_rows, [-1, x_rows.shape[-1]])
    return tf.reshape(tf.gather(x_rows, tf.constant(index, tf.int32), axis=1), [-1, k * x_rows.shape[-1]])


def _near_cols(rows: tf.Tensor, near: np.ndarray, near_index: np.ndarray, k: int) -> tf.Tensor:
    """Patch rows [N * len(near_index) / k, k * C] from the few pixels `near` of rows [N, pixels, C]
    and a zero row after them (near_index == len(near)): padding without a padded copy of rows."""
    near_rows = tf.pad(tf.gather(rows, tf.constant(near, tf.int32), axis=1), [[0, 0], [0, 1], [0, 0]])
    return _gather_rows(near_rows, near_index, k)


def _split_border(index: np.ndarray, outside: int):
    """For patch indices [pixels, taps] with `outside` for a tap in the padding: (interior pixels,
    border pixels, the pixels the border reads, the border's index into them + a zero row)."""
    whole = (index != outside).all(axis=1)
    border = index[~whole]
    near = np.unique(border[border != outside])
    near_index = np.where(border != outside, np.searchsorted(near, border), near.size)
    return np.flatnonzero(whole), np.flatnonzero(~whole), near, near_index.reshape(-1)


def _border_cols(x_rows: tf.Tensor, plan: _GatherPlan, k: int) -> tf.Tensor:
    """The border outputs' patch rows [N * B, k * C], zeros where a tap is in the padding."""
    return _near_cols(x_rows, plan.near, plan.near_index, k)


def _border_index(n: tf.Tensor, border: np.ndarray) -> tf.Tensor:
    """[N, B, 2]: (image, output) of every border output, for tensor_scatter_nd_update."""
    images = tf.broadcast_to(tf.range(n)[:, None], tf.stack([n, border.size]))
    outputs = tf.broadcast_to(tf.constant(border, tf.int32)[None, :], tf.stack([n, border.size]))
    return tf.stack([images, outputs], axis=-1)


# The gather form's forward pass, and both passes of the Winograd forms, work on a band of images at
# a time, each band's patch matrix (tiles) about this many bytes: made and read while still in the
# caches, where the whole batch's (conv2 of the seed network: 368 MB at batch 64) streams through
# memory twice. conv2's forward, bias and ReLU at batch 64 (an AVX-512 Xeon without AMX): 99-104 ms
# in bands of 1-2 images against 120-126 whole; 171-175 against 213-215 under
# ONEDNN_MAX_CPU_ISA=AVX2; bands of 8 images (46 MB) or more gained nothing.
BAND_BYTES = 16 * 1024 * 1024


def _image_ranges(n: int | None, bytes_per_image: int) -> list[tuple[int, int]] | None:
    """Static (start, stop) ranges of a batch of n images, about BAND_BYTES each (_band_count);
    None for one pass over the whole batch (unknown when traced, or within one band)."""
    k = 1 if n is None else min(n, _band_count(bytes_per_image, n))
    if k == 1:
        return None
    edges = [n * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _gather_matmul(x_rows: tf.Tensor, plan: _GatherPlan, k: int, w2: tf.Tensor, epilogue=lambda y: y) -> tf.Tensor:
    """epilogue(cols @ w2) as [N, ho, wo, Cout], cols the plan's patch matrix of x_rows, in bands
    of images (BAND_BYTES) where the batch is known when traced."""
    ranges = _image_ranges(x_rows.shape[0], plan.ho * plan.wo * k * x_rows.shape[-1] * x_rows.dtype.size)
    if ranges is None:
        return _gather_matmul_band(x_rows, plan, k, w2, epilogue)
    # A slice of whole images is a view of x_rows; the bands' outputs are concatenated (a copy of
    # y, a fraction of the patch matrix: Cout against kh*kw*Cin columns).
    return tf.concat([_gather_matmul_band(x_rows[a:b], plan, k, w2, epilogue) for a, b in ranges], axis=0)


def _gather_matmul_band(x_rows: tf.Tensor, plan: _GatherPlan, k: int, w2: tf.Tensor, epilogue) -> tf.Tensor:
    cout = w2.shape[-1]
    y = tf.reshape(epilogue(tf.matmul(_gather_rows(x_rows, plan.index, k), w2)), [-1, plan.ho * plan.wo, cout])
    if plan.border.size:  # their rows of y read pixel 0 for the padding: made again right
        y_border = epilogue(tf.matmul(_border_cols(x_rows, plan, k), w2))
        y_border = tf.reshape(y_border, [-1, plan.border.size, cout])
        y = tf.tensor_scatter_nd_update(y, _border_index(tf.shape(x_rows)[0], plan.border), y_border)
    return tf.reshape(y, [-1, plan.ho, plan.wo, cout])


# The backward pass works in bands too (of images for dL/dw, of pixels for dL/dx), one after
# another, each gathering about BAND_BYTES. Gathered whole, conv2's patch matrix and stride phases
# (0.7 and 1.5 GB at batch 128 in fp32) raised the seed network's peak tensor memory from 2.8 to
# 3.2 GiB (native: 2.0) and its peak RSS to 1.5x native's. Bands of 16 MB are faster than the 64 MB
# they had been: conv2's forward and both gradients at batch 128 (AVX-512 Xeon without AMX, two
# runs of ten alternating rounds) 658-681 ms best, 713-816 median, against 718-770 and 774-864;
# 8 MB gained nothing more. Where the batch is unknown when traced, bands are cut per image, as if
# at batch 128.
BAND_BYTES_PER_IMAGE = BAND_BYTES // 128


def _band_count(bytes_per_image: int, batch: int | None) -> int:
    """How many bands of about BAND_BYTES a batch (unknown: per BAND_BYTES_PER_IMAGE) makes."""
    if batch is None:
        return max(1, -(-bytes_per_image // BAND_BYTES_PER_IMAGE))
    return max(1, -(-bytes_per_image * batch // BAND_BYTES))


def _bands(rows: int, bytes_per_row: int, batch: int | None) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of an image's rows, each about BAND_BYTES over the batch."""
    n = min(rows, _band_count(rows * bytes_per_row, batch))
    edges = np.linspace(0, rows, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _image_bands(x: tf.Tensor, bytes_per_image: int) -> list[tuple]:
    """(start, stop) image ranges of x's batch, each about BAND_BYTES.

    The filter gradients go band by band over images, not rows: a slice of whole images is a view
    of dy (TensorFlow shares the buffer of a dim-0 slice), where a band of rows across the batch
    is a copy (the stem's two at batch 64: 14 ms of a 1,075 ms step on an AVX-512 Xeon).
    """
    if x.shape[0] is not None:
        return _image_ranges(x.shape[0], bytes_per_image) or [(0, None)]
    # With the batch unknown when traced, at most 64 bands, cut at run time (some may be empty).
    k = min(_band_count(bytes_per_image, None), 64)
    if k == 1:
        return [(0, None)]
    n = tf.shape(x)[0]
    edges = [n * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _gather_conv(x: tf.Tensor, w: tf.Tensor, sh: int, sw: int, same: bool) -> tf.Tensor:
    kh, kw, _, cout = w.shape
    _, h, wd, cin = x.shape
    k = kh * kw
    plan = _gather_plan(h, wd, kh, kw, sh, sw, same)
    ho, wo = plan.ho, plan.wo

    @tf.custom_gradient
    def conv(x, w):
        x_rows = _source(x, plan)
        y = _gather_matmul(x_rows, plan, k, tf.reshape(w, [-1, cout]))

        @_in_backward_scope
        def grad(dy):
            # dW = cols^T dy with cols gathered again, band by band, rather than kept from the
            # forward pass: far less memory, for a gather that is a small part of this matmul.
            dw = None
            for n0, n1 in _image_bands(x, ho * wo * k * cin * x.dtype.size):
                with tf.control_dependencies([] if dw is None else [dw]):
                    band = _gather_rows(x_rows[n0:n1], plan.index, k)
                part = tf.matmul(band, tf.reshape(dy[n0:n1], [-1, cout]), transpose_a=True)
                dw = part if dw is None else dw + part
            if plan.border.size:  # less what the padding's stand-in pixels added
                rows = np.reshape(plan.index, [ho * wo, k])[plan.border].reshape(-1)
                wrong = _gather_rows(x_rows, rows, k) - _border_cols(x_rows, plan, k)
                dy_border = tf.gather(tf.reshape(dy, [-1, ho * wo, cout]), tf.constant(plan.border, tf.int32), axis=1)
                dw -= tf.matmul(wrong, tf.reshape(dy_border, [-1, cout]), transpose_a=True)
            dw = tf.reshape(dw, [kh, kw, cin, cout])
            with tf.control_dependencies([dw]):  # one band of either gradient alive at a time
                return input_grad(dy, w, h, wd, sh, sw, plan.pt, plan.pl), dw

        return y, grad

    return conv(x, w)


def _input_grad_plan(
    h: int, wd: int, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, ho: int, wo: int
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Static gather indices for dL/dx, one group per stride phase.

    Input pixel (r, c) is only touched by the taps i = (r+pt) mod sh (+ multiples of sh) and
    likewise for columns, so each phase (a, b) of the input is a stride-1 transposed convolution
    of dy with the sub-kernel w[a::sh, b::sw]: same FLOPs as a col2im scatter-add, but each piece
    is one dense matmul. Returns [(a, b, dy index [phase rows, phase columns * taps] (ho * wo: the
    zero row), image pixel [phase rows, phase columns])].
    """
    zero_dy = ho * wo
    phases = []
    for a in range(sh):
        rows = np.array([r for r in range(h) if (r + pt) % sh == a])
        taps_i = np.arange(a, kh, sh)
        for b in range(sw):
            cols = np.array([c for c in range(wd) if (c + pl) % sw == b])  # image columns
            taps_j = np.arange(b, kw, sw)
            if not (rows.size and cols.size and taps_i.size and taps_j.size):
                continue
            oh = ((rows + pt) // sh)[:, None, None, None] - (taps_i // sh)[None, None, :, None]
            ow = ((cols + pl) // sw)[None, :, None, None] - (taps_j // sw)[None, None, None, :]
            inside = (oh >= 0) & (oh < ho) & (ow >= 0) & (ow < wo)
            index = np.where(inside, oh * wo + ow, zero_dy).reshape(rows.size, -1)
            phases.append((a, b, index, rows[:, None] * wd + cols[None, :]))
    return phases


def gather_input_grad(
    dy: tf.Tensor, w: tf.Tensor, h: int, wd: int, sh: int, sw: int, pt: int, pl: int
) -> tf.Tensor:
    """dL/dx of the gather form, as gathers of dy and one matmul per stride phase and band."""
    kh, kw, cin, cout = w.shape
    ho, wo = dy.shape[1], dy.shape[2]
    if kh == kw == sh == sw == 1:
        dx = tf.matmul(tf.reshape(dy, [-1, cout]), w[0, 0], transpose_b=True)
        return tf.reshape(dx, [-1, h, wd, cin])
    n = tf.shape(dy)[0]
    phases = _input_grad_plan(h, wd, kh, kw, sh, sw, pt, pl, ho, wo)
    dy_rows = tf.reshape(dy, [-1, ho * wo, cout])
    pieces, pixels = [], []
    for a, b, index, where in phases:
        sub = tf.transpose(w[a::sh, b::sw], [0, 1, 3, 2])
        taps = sub.shape[0] * sub.shape[1]
        sub = tf.reshape(sub, [taps * cout, cin])
        index, where = index.reshape(-1, taps), where.reshape(-1)
        if np.array_equal(index.reshape(-1), np.arange(ho * wo)):
            # One tap reading dy pixel for pixel (a stride-2 3x3 layer's odd phase): dy is already
            # its patch matrix; a gather would only copy it (conv2 at batch 64: 8 ms).
            with tf.control_dependencies(pieces[-1:]):
                pieces.append(tf.matmul(tf.reshape(dy, [-1, cout]), sub))
            pixels.append(where)
            continue
        # Pixels whose taps all fall inside dy gather from dy itself, band by band, one phase after
        # another (see BAND_BYTES); the border's from its few pixels and a zero row: no
        # padded copy of dy (conv2 at batch 64: 13 ms).
        inner, border, near, near_index = _split_border(index, ho * wo)
        for r0, r1 in _bands(inner.size, taps * cout * dy.dtype.size, dy.shape[0]):
            with tf.control_dependencies(pieces[-1:]):
                band = _gather_rows(dy_rows, index[inner[r0:r1]].reshape(-1), taps)
            pieces.append(tf.matmul(band, sub))
            pixels.append(where[inner[r0:r1]])
        if border.size:
            with tf.control_dependencies(pieces[-1:]):
                pieces.append(tf.matmul(_near_cols(dy_rows, near, near_index, taps), sub))
            pixels.append(where[border])
    untouched = np.setdiff1d(np.arange(h * wd), np.concatenate(pixels))  # e.g. 1x1 stride 2
    if untouched.size:
        pieces.append(tf.zeros(tf.stack([n * untouched.size, cin]), dy.dtype))
        pixels.append(untouched)
    if len(pieces) == 1:
        return tf.reshape(pieces[0], [-1, h, wd, cin])
    # The phases' rows interleaved into image order by one stitch (no concatenated copy first).
    images = (tf.range(n) * (h * wd))[:, None]
    index = [tf.reshape(tf.constant(p, tf.int32)[None, :] + images, [-1]) for p in pixels]
    return tf.reshape(_stitch(index, pieces), [-1, h, wd, cin])


# The input gradient of a strided layer by col2im: every tap's product dy @ w^T in one matmul
# [M, Cout] x [Cout, kh*kw*Cin], each product then added into the input pixel it came from by an
# XLA-compiled overlap-add (TensorFlow has no cheap one: segment sums and scatters over the tap
# matrix cost more than the matmul saved). The stride-phase form above runs one matmul per phase
# with N = Cin output columns, slow on narrow N, plus gathers of dy and a stitch. conv2 of the seed
# network (3x3/2, 64->128), dL/dx alone, ms (Intel Xeon model 207, AVX-512, no AMX; best of 6-8;
# oneDNN's Conv2DBackpropInput in brackets): 100 px batch 64 95-113 against 139-177 (64-79);
# 64 px batch 16 7.9-9.9 against 11.9-13.8 (6.6-7.4); 32 px batch 128 16-23 against 26-38 (13-18).
# Its forward and both gradients, gather form, phases -> col2im (native): 100 px batch 128 499 ->
# 402 (339), 64 px batch 16 25.7 -> 21.2 (17.2); under ONEDNN_MAX_CPU_ISA=AVX2 856 -> 676 (796),
# 42.6 -> 33.6 (32.8); in bfloat16 608 -> 571 (533). Stride-1 layers keep the single phase: there
# col2im was level at best (3x3 64->64 on 25x25: 40.5 against 31.3 ms).
# Below COL2IM_MIN_BYTES of tap matrix at the batch the phase form stays: the overlap-add's XLA
# compile (0.1-0.6 s, once per run and shape) would cost more than it saves.
COL2IM_MIN_BYTES = 4 * 2**20
_OVERLAP_ADDS: dict = {}


def overlap_add(value, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int, h: int, wd: int, pt: int,
                pl: int) -> tf.Tensor:
    """The sum, at each input pixel [N, h, wd, C], of value(i, j) [N, ho, wo, C] (tap (i, j) of every
    output, called in row-major tap order) at the pixel that tap reads: output o's tap i is pixel
    o*s + i - pt. Whole-tensor pads, adds and one interleave of the stride phases, for XLA to
    compile into a few loops; pixels no tap reads (the end of a VALID input) get zeros."""
    hq, wq = ho + (kh - 1) // sh, wo + (kw - 1) // sw  # a stride phase's extent, every tap inside
    phases: dict = {}
    for i in range(kh):
        for j in range(kw):
            moved = tf.pad(value(i, j), [[0, 0], [i // sh, hq - ho - i // sh], [j // sw, wq - wo - j // sw], [0, 0]])
            phase = (i % sh, j % sw)
            phases[phase] = moved if phase not in phases else phases[phase] + moved
    zero = tf.zeros_like(next(iter(phases.values())))
    # [N, hq, sh, wq, sw, C] -> the padded input's pixels in order
    grid = tf.stack([tf.stack([phases.get((a, b), zero) for b in range(sw)], axis=3) for a in range(sh)], axis=2)
    dxp = tf.reshape(grid, [-1, hq * sh, wq * sw, grid.shape[-1]])
    dx = dxp[:, pt:pt + h, pl:pl + wd]
    if dx.shape[1] < h or dx.shape[2] < wd:
        dx = tf.pad(dx, [[0, 0], [0, h - dx.shape[1]], [0, wd - dx.shape[2]], [0, 0]])
    return dx


def _overlap_add_fn(kh: int, kw: int, sh: int, sw: int, ho: int, wo: int, h: int, wd: int, pt: int, pl: int):
    """One XLA-compiled taps [N, ho, wo, kh*kw*Cin] -> dL/dx per layer geometry (not per trace)."""
    key = (kh, kw, sh, sw, ho, wo, h, wd, pt, pl)
    if key not in _OVERLAP_ADDS:
        @tf.function(jit_compile=True)
        def add(taps):
            # Summed in float32 whatever the compute dtype: up to kh*kw terms per pixel.
            t = tf.reshape(tf.cast(taps, tf.float32), [-1, ho, wo, kh, kw, taps.shape[-1] // (kh * kw)])
            dx = overlap_add(lambda i, j: t[:, :, :, i, j], kh, kw, sh, sw, ho, wo, h, wd, pt, pl)
            return tf.cast(dx, taps.dtype)

        _OVERLAP_ADDS[key] = add
    return _OVERLAP_ADDS[key]


def col2im_input_grad(
    dy: tf.Tensor, w: tf.Tensor, h: int, wd: int, sh: int, sw: int, pt: int, pl: int
) -> tf.Tensor:
    """dL/dx as one matmul of dy by every tap's kernel, then the XLA overlap-add."""
    kh, kw, cin, cout = w.shape
    ho, wo = dy.shape[1], dy.shape[2]
    w_t = tf.transpose(tf.reshape(w, [kh * kw * cin, cout]))
    add = _overlap_add_fn(kh, kw, sh, sw, ho, wo, h, wd, pt, pl)

    def band(dy):
        return add(tf.reshape(tf.matmul(tf.reshape(dy, [-1, cout]), w_t), [-1, ho, wo, kh * kw * cin]))

    ranges = _image_ranges(dy.shape[0], ho * wo * kh * kw * cin * dy.dtype.size)
    if ranges is None:
        return band(dy)
    # In bands of images, one alive at a time: the whole tap matrix (conv2 at batch 128: 737 MB)
    # raised the seed network's peak RSS from 3.3 to 4.0 GiB. The bands' dL/dx are concatenated,
    # as the stride phases' pieces were stitched.
    pieces = []
    for a, b in ranges:
        with tf.control_dependencies(pieces[-1:]):
            pieces.append(band(dy[a:b]))
    return tf.concat(pieces, axis=0)


def input_grad(dy: tf.Tensor, w: tf.Tensor, h: int, wd: int, sh: int, sw: int, pt: int, pl: int) -> tf.Tensor:
    """dL/dx of the gather-based forms: col2im for a strided layer on a CPU, the stride phases else."""
    kh, kw, cin, _ = w.shape
    taps_bytes = (dy.shape[0] or 128) * dy.shape[1] * dy.shape[2] * kh * kw * cin * dy.dtype.size
    if (sh, sw) != (1, 1) and taps_bytes >= COL2IM_MIN_BYTES and not tf.config.list_physical_devices("GPU"):
        return col2im_input_grad(dy, w, h, wd, sh, sw, pt, pl)
    return gather_input_grad(dy, w, h, wd, sh, sw, pt, pl)


def _stitch(index: list[tf.Tensor], pieces: list[tf.Tensor]) -> tf.Tensor:
    """tf.dynamic_stitch(index, pieces) for indices that are all distinct.

    On CPU the parallel kernel: DynamicStitch copies its rows on one thread, ParallelDynamicStitch
    shards them over the intra-op threads (conv2's input gradient at batch 64: 42 against 70 ms on
    2 cores). Its one caveat, no order among duplicate indices, cannot arise here. A GPU keeps the
    plain op, whose kernel runs there (the parallel one is a host kernel).
    """
    if tf.config.list_physical_devices("GPU"):
        return tf.dynamic_stitch(index, pieces)
    return tf.raw_ops.ParallelDynamicStitch(indices=index, data=pieces)


# ---------------------------------------------------------------------------------------------
# pairs (stride 1, few input channels)
# ---------------------------------------------------------------------------------------------


def _pair_window(kw: int) -> int:
    """Pixel pairs per kernel row: two neighbouring outputs read kw + 1 pixels from an even one."""
    return (kw + 2) // 2


def _pair_source(x: tf.Tensor, kh: int, kw: int, same: bool):
    """(x padded and viewed as pixel pairs [N, lh * lw / 2, 2 * Cin], plan): what _pair_cols
    gathers from, padded once however many bands take from it."""
    _, h, wd, cin = x.shape
    ho, pt, pb = axis_plan(h, kh, 1, same)
    wo, pl, pr = axis_plan(wd, kw, 1, same)
    lw = wo + 2 * _pair_window(kw) - 2  # even: the last pair window ends there
    pr = lw - wd - pl  # >= the plan's own right padding; never reads a pixel the plan would not
    xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])
    return tf.reshape(xp, [-1, xp.shape[1] * lw // 2, 2 * cin]), (h, wd, cin, ho, wo, pt, pl)


def _pair_cols(src: tf.Tensor, kh: int, kw: int, ho: int, wo: int):
    """[N * ho * wo / 2, kh * q * 2 * Cin] with q = _pair_window(kw): row (n, oh, p) holds, for
    each kernel row i, the q pixel pairs from padded pixel (oh + i, 2p) on, the window of outputs
    (oh, 2p) and (oh, 2p + 1)."""
    q = _pair_window(kw)
    half = wo // 2 + q - 1  # pairs in a padded row
    oh, p, i, t = np.meshgrid(np.arange(ho), np.arange(wo // 2), np.arange(kh), np.arange(q), indexing="ij")
    index = tf.constant(((oh + i) * half + p + t).reshape(-1), tf.int32)
    return tf.reshape(tf.gather(src, index, axis=1), [-1, kh * q * src.shape[-1]])


def _pair_kernel(w: tf.Tensor) -> tf.Tensor:
    """[kh * q * 2 * Cin, 2 * Cout]: column block g is output pixel 2p + g, whose tap j reads window
    pixel j + g (zeros where a window pixel is outside its kernel)."""
    kh, kw, cin, cout = w.shape
    q2 = 2 * _pair_window(kw)
    return tf.concat([tf.reshape(tf.pad(w, [[0, 0], [g, q2 - kw - g], [0, 0], [0, 0]]), [-1, cout])
                      for g in range(2)], axis=1)


def _pairs_conv(x: tf.Tensor, w: tf.Tensor, same: bool) -> tf.Tensor:
    kh, kw, cin, cout = w.shape
    q2 = 2 * _pair_window(kw)

    @tf.custom_gradient
    def conv(x, w):
        src, (h, wd, _, ho, wo, pt, pl) = _pair_source(x, kh, kw, same)
        y = tf.reshape(tf.matmul(_pair_cols(src, kh, kw, ho, wo), _pair_kernel(w)), [-1, ho, wo, cout])

        @_in_backward_scope
        def grad(dy):
            # As the gather form: the pairs gathered again band by band (from one padded copy, not
            # kept from the forward pass), then each output pixel's block of the pair kernel's
            # gradient folded back onto the taps it came from.
            src = _pair_source(x, kh, kw, same)[0]
            dw = None
            for n0, n1 in _image_bands(x, ho * wo * kh * q2 * cin * x.dtype.size // 2):
                with tf.control_dependencies([] if dw is None else [dw]):
                    band = _pair_cols(src[n0:n1], kh, kw, ho, wo)
                part = tf.matmul(band, tf.reshape(dy[n0:n1], [-1, 2 * cout]), transpose_a=True)
                dw = part if dw is None else dw + part
            dw = tf.reshape(dw, [kh, q2, cin, 2, cout])
            dw = dw[:, :kw, :, 0] + dw[:, 1:kw + 1, :, 1]
            with tf.control_dependencies([dw]):
                return gather_input_grad(dy, w, h, wd, 1, 1, pt, pl), dw

        return y, grad

    return conv(x, w)


# ---------------------------------------------------------------------------------------------
# matmul (1x1 kernels)
# ---------------------------------------------------------------------------------------------


def _subsample(x: tf.Tensor, sh: int, sw: int, same: bool) -> tf.Tensor:
    """x[:, ::sh, ::sw] (a 1x1 kernel's taps) by reshape and slice: strided slices are slow on CPU."""
    if sh == sw == 1:
        return x
    _, h, wd, c = x.shape
    ho, wo = -(-h // sh), -(-wd // sw)  # SAME and VALID agree for 1x1 kernels
    x = tf.pad(x, [[0, 0], [0, ho * sh - h], [0, wo * sw - wd], [0, 0]]) if (ho * sh, wo * sw) != (h, wd) else x
    x = tf.reshape(x, [-1, ho, sh, wo, sw * c])
    return tf.reshape(tf.slice(x, [0, 0, 0, 0, 0], [-1, ho, 1, wo, c]), [-1, ho, wo, c])


def _matmul_conv(x: tf.Tensor, w: tf.Tensor, sh: int, sw: int, same: bool) -> tf.Tensor:
    _, h, wd, cin = x.shape
    cout = w.shape[-1]

    @tf.custom_gradient
    def conv(x, w):
        xs = _subsample(x, sh, sw, same)
        ho, wo = xs.shape[1], xs.shape[2]
        cols = tf.reshape(xs, [-1, cin])
        y = tf.reshape(tf.matmul(cols, w[0, 0]), [-1, ho, wo, cout])
        @_in_backward_scope
        def grad(dy):
            dy2 = tf.reshape(dy, [-1, cout])
            dw = tf.reshape(tf.matmul(cols, dy2, transpose_a=True), [1, 1, cin, cout])
            dxs = tf.reshape(tf.matmul(dy2, w[0, 0], transpose_b=True), [-1, ho, 1, wo, 1, cin])
            if sh == sw == 1:
                return tf.reshape(dxs, [-1, h, wd, cin]), dw
            # The taps' gradient back on the stride grid, zeros between (one pad), then cropped.
            dx = tf.pad(dxs, [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]])
            dx = tf.reshape(dx, [-1, ho * sh, wo * sw, cin])
            return (dx if (ho * sh, wo * sw) == (h, wd) else tf.slice(dx, [0, 0, 0, 0], [-1, h, wd, cin])), dw

        return y, grad

    return conv(x, w)


# ---------------------------------------------------------------------------------------------
# winograd: F(4x4, 3x3) and F(4x4, 5x5); F(2x2, 3x3) in 16-bit floats
# ---------------------------------------------------------------------------------------------

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): for an a x a input tile
# d (a = m + r - 1) and an r x r kernel g, the m x m outputs are A^T [(G g G^T) * (B^T d B)] A,
# Toom-Cook at a - 1 points and infinity. 3x3 (and winograd_s2's 2x2) kernels take 6x6 tiles
# (F(4x4, 3x3): points 0, +-1, +-2); 5x5 kernels 8x8 (F(4x4, 5x5): and +-1/2), where F(2x2, 5x5)'s
# 6x6 tiles had copied each input pixel 9 times: the cifar10_tutorial's 5x5 64->64 at 12x12,
# forward and both gradients, batch 128, 22.8 ms against 40.1 (native 27.5); under
# ONEDNN_MAX_CPU_ISA=AVX2 38.7 against 61.2 (native 63.1). Error against tf.nn.conv2d ~1e-5 of
# the largest value either way. (8x8 tiles for 3x3, F(6x6, 3x3), timed level with 6x6: not used.)
_POINTS = np.array([0, 1, -1, 2, -2, 0.5, -0.5], np.float64)


# In bfloat16 the transformed tiles and kernels are rounded to 8 bits of mantissa before their
# products, and the output transform sums 36 of them with weights up to 8 (F(4x4, 3x3)): 3.1% RMS
# error against float32 tf.nn.conv2d, where the gather form's is 0.29% (the seed's 3x3 layers,
# forward and both gradients alike). F(2x2, 3x3) on 4x4 tiles, at the points 0 and +-1 (weights 0,
# +-1, +-1/2), errs 0.55%, and still does 2.25x fewer multiplies than the gather: forward and both
# gradients in bfloat16 (AMD EPYC Zen 4 with avx512_bf16, batch 128, ms) 84.8 against the gather's
# 104.8 for 64->96 at 25x25, 75.5 against 86.7 for 64->64; at the photos' batch 16, 64->96 at 16x16,
# 4.3 against 6.7; level on 13x13 and smaller. Training on the photos at the defaults (64 px, batch
# 16, bfloat16), steps in 1.5 minutes 750, 804 -> 839, 852. In float32 F(4x4, 3x3) was the faster
# (116.8 against 147.1 ms for 64->96 at 25x25).
LOW_PRECISION = ("bfloat16", "float16")


def tile_side(r: int, dtype: str = "float32") -> int:
    """The input tile side a of the Winograd form for an r x r kernel in `dtype`."""
    if r == 3 and dtype in LOW_PRECISION:
        return 4
    return 8 if r == 5 else 6


def _winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T [a,a], G [a,r], A^T [m,a]) of F(m, r), a = m + r - 1, at the first a - 1 _POINTS.

    B^T's row for a point p holds the coefficients of the product of (x - q) over the other
    points (infinity's row: over all of them); A^T evaluates the outputs' polynomial at the points
    (rows p^i, and infinity's column picks the top coefficient); G is the kernel's Lagrange-scaled
    Vandermonde (Lavin's F(4,3) B^T and G for r = 3).
    """
    a = m + r - 1
    points = _POINTS[: a - 1]
    roots = np.polynomial.polynomial.polyfromroots
    bt = np.array([np.append(roots(np.delete(points, j)), 0.0) for j in range(a - 1)] + [roots(points)])
    scale = np.array([np.prod([p - q for q in points if q != p]) for p in points])
    g = np.vstack([points[:, None] ** np.arange(r) / scale[:, None], np.eye(r)[-1:]])
    at = np.hstack([points[None, :] ** np.arange(m)[:, None], np.eye(m)[:, -1:]])
    return bt, g, at


class _WinogradPlan(NamedTuple):
    """Static row indices of one image; the batch offsets are added at run time."""
    a: int                # input tile side
    m: int                # outputs per tile side
    r: int                # kernel side
    ho: int
    wo: int
    tiles: int            # tiles per image
    tile_in: np.ndarray   # [a*a, tiles]: input pixel (r*W + c) of each tile tap, -1 for padding
    x_back: np.ndarray | None  # [H*W, k, 2]: (tap, tile) of the taps reading each pixel, -1: none
    y_out: np.ndarray     # [Ho*Wo, 2]: (output tap, tile) of each output pixel
    y_back: np.ndarray    # [m*m, tiles]: output pixel of each output tap of each tile, -1 outside


def _winograd_plan(h: int, wd: int, r: int, same: bool, side: int) -> _WinogradPlan:
    m = side - r + 1
    ho, wo = (h, wd) if same else (h - r + 1, wd - r + 1)
    pad = (r - 1) // 2 if same else 0
    th, tw = -(-ho // m), -(-wo // m)
    ty, tx, a, b = np.meshgrid(np.arange(th), np.arange(tw), np.arange(side), np.arange(side), indexing="ij")
    y, x = ty * m + a - pad, tx * m + b - pad
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < wd)
    tile_in = np.where(inside, y * wd + x, -1).transpose(2, 3, 0, 1).reshape(side * side, th * tw)
    # Pixel (y, x) is tap a = (y+pad) mod m (+ m, + 2m, ...) of row tile (y+pad) // m (- 1, - 2, ...):
    # ceil(a / m) candidates per axis (2 for F(4,3), F(4,5) and F(2,3), 2 for winograd_s2's F(5,2)).
    y, x = np.meshgrid(np.arange(h) + pad, np.arange(wd) + pad, indexing="ij")
    back = []
    for ky in range(-(-side // m)):
        for kx in range(-(-side // m)):
            ty, a, tx, b = y // m - ky, y % m + m * ky, x // m - kx, x % m + m * kx
            ok = (ty >= 0) & (ty < th) & (a < side) & (tx >= 0) & (tx < tw) & (b < side)
            back.append(np.stack([np.where(ok, a * side + b, -1), np.where(ok, ty * tw + tx, -1)], -1))
    x_back = np.stack(back, 2).reshape(h * wd, len(back), 2)
    oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    y_out = np.stack([(oy % m) * m + ox % m, (oy // m) * tw + ox // m], -1).reshape(ho * wo, 2)
    ty, tx, i, j = np.meshgrid(np.arange(th), np.arange(tw), np.arange(m), np.arange(m), indexing="ij")
    oy, ox = ty * m + i, tx * m + j
    y_back = np.where((oy < ho) & (ox < wo), oy * wo + ox, -1).transpose(2, 3, 0, 1).reshape(m * m, th * tw)
    return _WinogradPlan(side, m, r, ho, wo, th * tw, tile_in, x_back, y_out, y_back)


def _rows(src: tf.Tensor, channels: int) -> tf.Tensor:
    """src as rows [R, channels] plus one zero row at index R (what padding gathers)."""
    return tf.pad(tf.reshape(src, [-1, channels]), [[0, 1], [0, 0]])


def _tap_major(static: np.ndarray, n: tf.Tensor, per_image: int) -> tf.Tensor:
    """Row index [taps, N, tiles] of image-major rows (n * per_image + pixel); -1 -> the zero row."""
    base = tf.constant(static[:, None, :], tf.int32)
    index = base + (tf.range(n) * per_image)[None, :, None]
    return tf.where(base >= 0, index, n * per_image)


def _image_major(static: np.ndarray, n: tf.Tensor, tiles: int, taps: int) -> tf.Tensor:
    """Row index [N, pixels, k] into tap-major rows ((tap * N + n) * tiles + tile); -1 -> the zero row."""
    tap, tile = (tf.constant(static[None, ..., i], tf.int32) for i in (0, 1))
    images = tf.reshape(tf.range(n), [-1] + [1] * (static.ndim - 1))
    return tf.where(tap >= 0, (tap * n + images) * tiles + tile, taps * n * tiles)


def _winograd_conv(x: tf.Tensor, w: tf.Tensor, same: bool) -> tf.Tensor:
    _, h, wd, _ = x.shape
    r = w.shape[0]
    return _winograd_apply(x, w, _winograd_plan(h, wd, r, same, tile_side(r, x.dtype.name)), phases=1)


def _s2_plan(h: int, wd: int, same: bool) -> tuple[_WinogradPlan, int, int]:
    """(plan, pad_top, pad_left): the F(5x5, 2x2) plan of a 3x3 stride-2 layer on the half-size
    image z of its stride phases: z[i, j, (a, b)] = padded x[2i + a, 2j + b], so y[i, j] = sum
    over p, q in {0, 1} of z[i + p, j + q] . wz[p, q] (a VALID 2x2 convolution, z one pixel larger
    than y). Its tile taps index x's pixels directly, four per z pixel (tiles * 4 'tiles' of Cin
    channels each)."""
    ho, pt, _ = axis_plan(h, 3, 2, same)
    wo, pl, _ = axis_plan(wd, 3, 2, same)
    zh, zw = ho + 1, wo + 1
    plan = _winograd_plan(zh, zw, 2, False, tile_side(2))
    i, j, a, b = np.meshgrid(np.arange(zh), np.arange(zw), np.arange(2), np.arange(2), indexing="ij")
    y, x = 2 * i + a - pt, 2 * j + b - pl
    zx = np.where((y >= 0) & (y < h) & (x >= 0) & (x < wd), y * wd + x, -1).reshape(zh * zw, 4)
    tile_in = np.where(plan.tile_in[..., None] >= 0, zx[plan.tile_in], -1).reshape(plan.a * plan.a, -1)
    # The input gradient is the gather form's (x_back unused): the Winograd one gathers every
    # pixel's 4 overlapping tile taps at once, a buffer 4x the input (1.3 GB for the seed network's
    # conv2 at batch 128: peak RSS 6.2 GiB against the gather form's 3.8), and was no faster.
    return plan._replace(tile_in=tile_in, x_back=None), pt, pl


def _winograd_s2_conv(x: tf.Tensor, w: tf.Tensor, same: bool) -> tf.Tensor:
    _, h, wd, cin = x.shape
    # wz[p, q, (a, b, c)] = w[2p + a, 2q + b, c], zero where 2p + a or 2q + b is 3.
    wz = tf.pad(w, [[0, 1], [0, 1], [0, 0], [0, 0]])
    wz = tf.reshape(tf.transpose(tf.reshape(wz, [2, 2, 2, 2, cin, -1]), [0, 2, 1, 3, 4, 5]), [2, 2, 4 * cin, -1])
    plan, pt, pl = _s2_plan(h, wd, same)
    return _winograd_apply(x, wz, plan, phases=4,
                           input_grad=lambda dy: input_grad(dy, w, h, wd, 2, 2, pt, pl))


class _Winograd(NamedTuple):
    """One layer's Winograd convolution: its plan, sizes and transforms, the 2-D transforms as
    matmuls over the tap axis of tap-major data: kron(B^T, B^T) [a*a, a*a], kron(G, G) [a*a, r*r],
    kron(A^T, A^T) [m*m, a*a]."""
    plan: _WinogradPlan
    h: int
    wd: int
    cin: int
    cz: int  # phases * cin: the channels of a tile tap
    cout: int
    bt: tf.Tensor
    g: tf.Tensor
    at: tf.Tensor

    def tiles(self, x: tf.Tensor) -> tf.Tensor:
        """The input's tiles after B^T, tap-major [a*a, N*tiles, phases*Cin]: the a*a tap GEMMs
        have the whole band as M."""
        taps = self.plan.a * self.plan.a
        d = tf.gather(_rows(x, self.cin), _tap_major(self.plan.tile_in, tf.shape(x)[0], self.h * self.wd))
        return tf.reshape(tf.matmul(self.bt, tf.reshape(d, [taps, -1])), [taps, -1, self.cz])

    def forward(self, x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        plan, m = self.plan, self.plan.m
        prod = tf.matmul(self.tiles(x), u)  # [a*a, N*tiles, Cout]
        yt = tf.matmul(self.at, tf.reshape(prod, [plan.a * plan.a, -1]))  # [m*m, N*tiles*Cout]
        y = tf.gather(tf.reshape(yt, [-1, self.cout]), _image_major(plan.y_out, tf.shape(x)[0], plan.tiles, m * m))
        return tf.reshape(y, [-1, plan.ho, plan.wo, self.cout])

    def backward(self, x: tf.Tensor, dy: tf.Tensor, u: tf.Tensor, want_dx: bool, after: list):
        """(dL/du summed over this band's tiles [a*a, phases*Cin, Cout], this band's dL/dx or None),
        begun once the ops in `after` (the previous band's) have run."""
        plan, m, taps, n = self.plan, self.plan.m, self.plan.a * self.plan.a, tf.shape(dy)[0]
        # The output gather's adjoint is a gather too (a permutation, zeros where tiles overhang).
        with tf.control_dependencies(after):  # one band alive at a time
            dyt = tf.gather(_rows(dy, self.cout), _tap_major(plan.y_back, n, plan.ho * plan.wo))
        dprod = tf.reshape(tf.matmul(self.at, tf.reshape(dyt, [m * m, -1]), transpose_a=True), [taps, -1, self.cout])
        # The tiles made again rather than kept from the forward pass: kept, every Winograd layer
        # held 2.25x its input (1.44x for winograd_s2) until its backward. The control dependency
        # holds the remaking back until this layer's backward has begun; without it the executor
        # ran it early, while every activation was still alive (the seed network at batch 128:
        # allocator peak 2.83 GiB, 2.13-2.19 with it, 2.71-2.74 kept).
        with tf.control_dependencies([dprod]):
            v = self.tiles(x)
        du = tf.matmul(v, dprod, transpose_a=True)  # [a*a, Cin, Cout], summed over the tiles
        if not want_dx:
            return du, None
        dv = tf.matmul(dprod, u, transpose_b=True)  # [a*a, N*tiles, Cin]
        # B's adjoint with an extra zero row: its output ends in zero rows that the gather below
        # reads for missing taps (cheaper than padding its output).
        dd = tf.matmul(tf.pad(tf.transpose(self.bt), [[0, 1], [0, 0]]), tf.reshape(dv, [taps, -1]))
        # Overlapping tiles: each pixel sums the tile taps that read it.
        dx = tf.gather(tf.reshape(dd, [-1, self.cin]), _image_major(plan.x_back, n, plan.tiles, taps))
        return du, tf.reshape(tf.reduce_sum(dx, axis=2), [-1, self.h, self.wd, self.cin])


def _winograd_apply(x: tf.Tensor, w: tf.Tensor, plan: _WinogradPlan, phases: int, input_grad=None) -> tf.Tensor:
    """y of the plan's Winograd convolution of x by w [r, r, phases * Cin, Cout]: each of the plan's
    tile taps gathers `phases` pixels of x side by side as its phases * Cin channels. dL/dx is
    input_grad(dy) where given (run after dL/dw, so the tiles are freed first), else Winograd's.
    Both passes take a band of images (BAND_BYTES of tiles) at a time."""
    _, h, wd, cin = x.shape
    r, cout, cz = w.shape[0], w.shape[-1], phases * cin
    bt, g, at = (tf.constant(np.kron(t, t), x.dtype) for t in _winograd_matrices(plan.m, r))
    op = _Winograd(plan, h, wd, cin, cz, cout, bt, g, at)
    taps = plan.a * plan.a
    ranges = _image_ranges(x.shape[0], taps * plan.tiles * max(cz, cout) * x.dtype.size)

    @tf.custom_gradient
    def conv(x, w):
        u = tf.reshape(tf.matmul(g, tf.reshape(w, [r * r, cz * cout])), [taps, cz, cout])
        y = tf.concat([op.forward(x[a:b], u) for a, b in ranges], axis=0) if ranges else op.forward(x, u)

        @_in_backward_scope
        def grad(dy):
            du, dx, after = None, [], []
            for a, b in ranges or [(0, None)]:
                band = (x, dy) if ranges is None else (x[a:b], dy[a:b])
                part, dx_band = op.backward(*band, u, input_grad is None, after)
                du = part if du is None else du + part
                dx += [] if dx_band is None else [dx_band]
                after = [du] + dx[-1:]
            dw = tf.reshape(tf.matmul(g, tf.reshape(du, [taps, -1]), transpose_a=True), [r, r, cz, cout])
            if input_grad is not None:
                with tf.control_dependencies([dw]):
                    return input_grad(dy), dw
            return (tf.concat(dx, axis=0) if len(dx) > 1 else dx[0]), dw

        return y, grad

    return conv(x, w)
