"""A trained run as a SavedModel that takes encoded images: the serving graph and its export.

The module's `serve(images)` takes a batch of encoded image files (tf.string: JPEG, PNG, BMP, GIF
or WebP bytes; not TIFF, HEIC or AVIF, which TensorFlow cannot decode) and returns `probabilities`
[N, classes], `top_k_indices`, `top_k_classes` and `top_k_probabilities` [N, K]. hw2's eval
preprocessing runs inside in TensorFlow ops, so a user needs only TensorFlow; it decodes as
hw2_dataset.read_image does (EXIF orientation, PIL's draft scale for big JPEGs, PNG transparency
over white), and resampling differs from PIL's by a few grey levels where a resize is needed. The graph computes in
fp32 through tf.nn.conv2d, whatever precision trained the weights.
"""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np

import run_dir
import utils
from utils import UserError

def exif_orientation(encoded):
    """The EXIF orientation tag (1-8) of a JPEG's bytes, 1 when there is none; TensorFlow ops only.

    Reads the APP1 "Exif" block's TIFF header and IFD0 (the tag a phone writes when it stores a
    photo sideways), looking no further than the first 64 KiB, where APP1 must sit.
    """
    import tensorflow as tf
    head = tf.strings.substr(encoded, 0, 65536)
    data = tf.cast(tf.io.decode_raw(head + b"\0" * 1024, tf.uint8), tf.int32)  # reads past the end see 0
    last = tf.size(data) - 1
    parts = tf.strings.split(head, b"Exif\0\0", maxsplit=1)
    tiff = tf.strings.length(parts[0]) + 6  # where the TIFF header starts, if `found`
    found = tf.size(parts) == 2

    def byte(i):
        return tf.gather(data, tf.clip_by_value(i, 0, last))

    little = tf.equal(byte(tiff), 0x49)  # "II" little-endian, "MM" big-endian

    def u16(i):
        lo, hi = tf.where(little, byte(i), byte(i + 1)), tf.where(little, byte(i + 1), byte(i))
        return lo + 256 * hi

    def u32(i):
        lo, hi = u16(i), u16(i + 2)
        return tf.where(little, lo + 65536 * hi, hi + 65536 * lo)

    valid = found & tf.reduce_any([byte(tiff) == m for m in (0x49, 0x4D)]) & tf.equal(u16(tiff + 2), 42)
    ifd = tiff + u32(tiff + 4)
    entries = ifd + 2 + 12 * tf.range(64)  # tag (2 bytes), type (2), count (4), value (4)
    match = (tf.range(64) < u16(ifd)) & tf.equal(u16(entries), 0x0112)
    value = tf.reduce_max(tf.where(match, u16(entries + 8), 0))
    ok = valid & tf.reduce_any(match) & (value >= 1) & (value <= 8)
    return tf.where(ok, value, 1)


def apply_orientation(image, orientation):
    """Turns a decoded image upright from its EXIF orientation, as PIL's ImageOps.exif_transpose."""
    import tensorflow as tf
    # Moved as float32 (exact for 0..255): oneDNN's transpose logs an error line for integer types.
    x = tf.cast(image, tf.float32)

    def t(v):
        return tf.transpose(v, [1, 0, 2])

    flipped = tf.switch_case(tf.convert_to_tensor(orientation, tf.int32) - 1, [
        lambda: x,
        lambda: tf.reverse(x, [1]),  # mirrored left-right
        lambda: tf.reverse(x, [0, 1]),  # 180 degrees
        lambda: tf.reverse(x, [0]),  # mirrored top-bottom
        lambda: t(x),  # transpose
        lambda: tf.reverse(t(x), [1]),  # stored 90 degrees counter-clockwise: turn clockwise
        lambda: tf.reverse(t(x), [0, 1]),  # transverse
        lambda: tf.reverse(t(x), [0]),  # turn counter-clockwise
    ])
    return tf.cast(flipped, image.dtype)


def decode_upright(encoded, short_side: int):
    """Encoded bytes -> uint8 RGB [H, W, 3] as hw2_dataset.read_image decodes them, before resizing.

    As in that reader, a big JPEG is decoded at 1/2, 1/4 or 1/8 scale where its short side stays
    >= short_side (PIL's draft mode: libjpeg's scaled IDCT), a JPEG is turned upright by its EXIF
    orientation, and a PNG's transparency is composited over white. Unlike it, a WebP's or GIF's
    transparency is dropped and a GIF gives its first frame.
    """
    import tensorflow as tf

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        fit = tf.minimum(shape[0], shape[1]) // short_side
        # PIL's libjpeg decodes with the accurate integer DCT; TensorFlow's default is the fast one.
        return tf.switch_case(tf.reduce_sum(tf.cast(fit >= [2, 4, 8], tf.int32)), [
            lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in (1, 2, 4, 8)])

    def png_over_white():
        rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.int32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        # PIL's paste-with-mask blend, rounding included: (x + 128 + ((x + 128) >> 8)) >> 8 ~ x / 255.
        blend = rgb * alpha + 255 * (255 - alpha) + 128
        shift = tf.bitwise.right_shift
        return tf.cast(shift(blend + shift(blend, 8), 8), tf.uint8)

    is_jpeg = tf.io.is_jpeg(encoded)
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), b"\x89PNG\r\n\x1a\n")
    image = tf.case([(is_jpeg, jpeg), (is_png, png_over_white)],
                    default=lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    image = apply_orientation(image, tf.cond(is_jpeg, lambda: exif_orientation(encoded), lambda: 1))
    image.set_shape([None, None, 3])
    return image


def preprocess_bytes(encoded, cfg):
    """Encoded image bytes -> float32 [S, S, C], as hw2_input.eval_dataset prepares images.

    hw2 decodes with PIL (decode_upright does the same in TensorFlow), resizes the short side to
    augmentation.base_short_side(cfg) (bicubic up, bilinear down) and rounds to uint8, then applies
    augmentation.eval_preprocess. Here TensorFlow does the same steps, so pixel values differ by a
    few levels of rounding and filter detail where a resize is needed.
    """
    import tensorflow as tf

    import augmentation
    short = augmentation.base_short_side(cfg)
    image = decode_upright(encoded, short)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    scale = tf.cast(short, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    # Same rounding as hw2_dataset.read_image: the long side is int(x + 0.5).
    size = tf.where(h <= w,
                    tf.stack([short, tf.cast(tf.cast(w, tf.float32) * scale + 0.5, tf.int32)]),
                    tf.stack([tf.cast(tf.cast(h, tf.float32) * scale + 0.5, tf.int32), short]))
    size = tf.maximum(size, 1)

    def resized():
        up = tf.image.resize(image, size, method="bicubic")
        down = tf.image.resize(image, size, method="bilinear", antialias=True)
        out = tf.where(tf.minimum(h, w) < short, up, down)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    image = tf.cond(tf.equal(tf.minimum(h, w), short), lambda: image, resized)
    return augmentation.eval_preprocess(image, cfg)


def serving_model(run: str, checkpoint: str, raw: bool = False):
    """The run's RunModel in fp32 holding the checkpoint's (EMA or raw) weights, its convolutions
    through tf.nn.conv2d: a graph of standard ops only (no custom-gradient function of ours), which
    any TensorFlow or TFLite runtime runs at its native speed."""
    import layers
    saved = run_dir.RunModel(run, precision_name="fp32")
    saved.restore(checkpoint, averaged=not raw)
    layers.set_conv_impl(saved.model, "native")
    return saved


def build_serving_module(run: str, checkpoint: str, raw: bool = False, top_k: int | None = None,
                         tta: str = "auto"):
    """A tf.Module whose `serve(images: [N] tf.string)` returns probabilities and the top-k classes;
    with tta "flip" (auto: where the run trained with flip_lr) the probabilities are the mean of
    each image's and its mirror's."""
    import tensorflow as tf

    import augmentation
    import evaluation
    evaluation.check_tta(tta)
    saved = serving_model(run, checkpoint, raw)
    cfg, class_names, model = saved.cfg, saved.class_names, saved.model
    tta = evaluation.resolve_tta(tta, cfg)
    k = top_k or min(cfg.top_k, len(class_names))
    run_dir.check_top_k(k, len(class_names))
    size, channels, short_side = cfg.image_size, cfg.channels, augmentation.base_short_side(cfg)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="hw2_serving")
            self.model = model
            # A class folder named in Latin-1 becomes caf\xe9: tf.string outputs should be UTF-8.
            self.class_names = tf.Variable([run_dir.valid_utf8(n) for n in class_names], trainable=False,
                                           dtype=tf.string, name="class_names")
            self.image_size = tf.Variable(size, trainable=False, name="image_size")
            # What serve() resizes the short side to first: a caller that decodes a TIFF or HEIC
            # itself (hw2_predict) hands over that size, which serve() then leaves as it is.
            self.short_side = tf.Variable(short_side, trainable=False, name="short_side")
            self.top_k = tf.Variable(k, trainable=False, name="top_k")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images):
            x = tf.map_fn(lambda b: preprocess_bytes(b, cfg), images,
                          fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))
            probabilities = evaluation.tta_probabilities(self.model, x, tta)
            top = tf.math.top_k(probabilities, k=k)
            return {"probabilities": probabilities, "top_k_indices": top.indices,
                    "top_k_classes": tf.gather(self.class_names, top.indices),
                    "top_k_probabilities": top.values}

    module = Serving()
    module.info = {"class_names": class_names, "top_k": k, "image_size": size, "checkpoint": checkpoint,
                   "weights": "raw" if raw else "ema", "tta": tta, "section": cfg.section, "config": cfg}
    return module


def export(run: str, checkpoint: str, export_dir: str, raw: bool = False, top_k: int | None = None,
           tta: str = "auto", tflite: str | None = None) -> dict:
    """Write the SavedModel (plus hw2_export.json describing it; with `tflite`, one of
    TFLITE_QUANTIZE, model.tflite and model.tflite.json too) to export_dir; returns that description."""
    import tensorflow as tf

    import run_record
    module = build_serving_module(run, checkpoint, raw, top_k, tta)
    tmp = export_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
    trained = run_dir.trained_precision(run)
    info = {**module.info, "hw2_version": run_record.HW2_VERSION, "tensorflow": tf.__version__,
            # The graph computes in fp32 whatever trained the weights: bf16-trained weights then
            # give probabilities within ~0.05 of hw2_eval's bf16 ones (tests/test_export.py).
            "trained_precision": trained, "served_precision": "fp32",
            "signature": "serving_default: images [N] tf.string (encoded JPEG/PNG/BMP/GIF) -> "
                         "probabilities [N, C], top_k_indices, top_k_classes, top_k_probabilities [N, K]",
            "tflite": TFLITE if tflite else None}
    if tflite:
        write_tflite(module, os.path.join(tmp, TFLITE), info, tflite)
    run_dir.save_json(os.path.join(tmp, "hw2_export.json"), info)
    if os.path.isdir(export_dir):
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)
    return info


# ------------------------------------------------------------------------------------- TFLite

TFLITE = "model.tflite"
TFLITE_CONFIG_KEYS = ("image_size", "channels", "eval_scale", "scale_max", "crop_mode")  # what eval preprocessing reads
# How model.tflite stores its weights. dynamic: 8-bit weights, dequantized or used by the
# interpreter's hybrid kernels, float activations; float16: half-size weights, computed in float32
# on a CPU. A hymenoptera run (64 px, 2 classes, tta none, AMD EPYC Zen 4, TensorFlow 2.21,
# bench/tflite_weights.py): none 5.05 MiB, 530 img/s; dynamic 1.30 MiB, 1,438 img/s; float16
# 2.54 MiB, 534 img/s; the same top-1 on its 153 test images, every argmax the same,
# probabilities within 0.012 (dynamic) and 0.0007 (float16).
# Full int8 is not offered: the per-image standardization's division failed in the interpreter.
TFLITE_QUANTIZE = ("none", "dynamic", "float16")


def write_tflite(module, path: str, info: dict, quantize: str = "none") -> None:
    """model.tflite: float32 [N, S, S, C] images (RGB 0-255, resized and cropped as hw2's eval does,
    not standardized) -> probabilities [N, classes], builtin ops only, its weights stored as
    `quantize` says (TFLITE_QUANTIZE); path + ".json" describes it."""
    import tensorflow as tf

    import augmentation
    import evaluation
    cfg, tta = info["config"], info["tta"]
    size, channels = cfg.image_size, cfg.channels

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, channels], tf.float32, name="images")])
    def classify(images):
        # As augmentation.eval_preprocess's last steps: uint8 -> 0..1 (convert_image_dtype), standardize.
        x = tf.image.per_image_standardization(images * (1.0 / 255.0))
        return {"probabilities": evaluation.tta_probabilities(module.model, x, tta)}

    # No trackable_obj (the "deprecated" path): given the module or the model, the converter keeps
    # the Keras weights as resource variables that no interpreter initializes (NaN out, or a
    # READ_VARIABLE error); without it, it freezes every captured weight into a constant.
    with utils.quieted("absl"):  # its warning that this path is deprecated
        converter = tf.lite.TFLiteConverter.from_concrete_functions([classify.get_concrete_function()])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # any runtime: no Flex ops
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)
    short = max(size, round(size * float(cfg.eval_scale)))
    squash = cfg.crop_mode == "squash"
    resize_to = {"resize_to": [short, short]} if squash else {"resize_short_side_to": short}
    run_dir.save_json(path + ".json", {
        "class_names": info["class_names"], "image_size": size, "channels": channels, "top_k": info["top_k"],
        "input": f"float32 [N, {size}, {size}, {channels}]: {'RGB' if channels == 3 else 'grey'} values 0-255, "
                 "resized and center-cropped as below, not standardized (the model standardizes each image)",
        "output": f"probabilities [N, {len(info['class_names'])}] in class_names order",
        "preprocessing": {
            "decode": "RGB, turned upright by its EXIF orientation, transparency composited over white",
            **resize_to,
            "resize": ("the whole image to a square, aspect changed; " if squash else "")
                      + f"bilinear, antialiased when shrinking (hw2: PIL to a short side of "
                      f"{augmentation.base_short_side(cfg)}, bilinear down or bicubic up, rounded to uint8; "
                      f"then TensorFlow bilinear to {short})",
            "center_crop": [size, size],
            "values": "float32 0-255" + ("" if channels == 3 else " of grey = tf.image.rgb_to_grayscale(RGB)")},
        "tta": tta, "weights": info["weights"], "quantize": quantize, "checkpoint": info["checkpoint"],
        "hw2_version": info["hw2_version"], "tensorflow": info["tensorflow"],
        "config": {k: cfg[k] for k in TFLITE_CONFIG_KEYS}})


class TFLiteModel:
    """A model.tflite written by write_tflite, with its JSON beside it, run by tf.lite.Interpreter on
    image files that hw2's own reader and eval preprocessing prepare."""

    def __init__(self, path: str):
        import tensorflow as tf

        import augmentation
        if not os.path.isfile(path):
            raise UserError(f"not found: {path}")
        try:
            with warnings.catch_warnings():  # its 5-line notice that LiteRT (ai_edge_litert) succeeds it
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                self.interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
        except ValueError as e:
            raise UserError(f"{path} is not a TFLite model: {str(e).strip().splitlines()[0][:160]}") from None
        self.info = run_dir.load_json(path + ".json", "its description (hw2_export.py --tflite writes it)")
        self.class_names, self.top_k = self.info["class_names"], self.info["top_k"]
        # Declared defaults for keys an older model.tflite.json lacks (crop_mode: center, as then).
        cfg = utils.config_from_json(self.info["config"], path + ".json")
        self.short_side = augmentation.base_short_side(cfg)
        # Unstandardized eval crops (0..1) of any image size, one trace.
        self._crop = tf.function(lambda image: augmentation.eval_preprocess(image, cfg, standardize=False),
                                 input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._batch = None

    def preprocess(self, path: str) -> np.ndarray:
        """float32 [S, S, C] 0-255: the image as hw2_eval prepares it, before standardization."""
        import hw2_dataset
        return self._crop(hw2_dataset.read_image(path, short_side=self.short_side)).numpy() * 255.0

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """[N, S, S, C] float32 0-255 -> probabilities [N, classes], for any N."""
        if images.shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self._input, images.shape, strict=True)
            self.interpreter.allocate_tensors()
            self._batch = images.shape[0]
        self.interpreter.set_tensor(self._input, np.ascontiguousarray(images, np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output).copy()

    def predict_files(self, paths: list[str], batch_size: int) -> list[tuple[np.ndarray | None, str]]:
        """(probabilities or None, error) per path; a file that cannot be read gets its error."""
        results: list[tuple[np.ndarray | None, str]] = [(None, "")] * len(paths)
        for start in range(0, len(paths), batch_size):
            good, images = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(self.preprocess(paths[i]))
                    good.append(i)
                except ValueError as e:  # read_image's message starts with the path
                    results[i] = (None, str(e).removeprefix(f"{os.fsdecode(paths[i])}: "))
            if images:
                for i, p in zip(good, self.probabilities(np.stack(images))):
                    results[i] = (p, "")
        return results
