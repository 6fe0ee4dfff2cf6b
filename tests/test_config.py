"""config.cfg sections, command-line overrides and the one-line errors for bad ones."""
import os
import subprocess
import sys

import pytest

import utils
from utils import UserError, load_config, parse_overrides


def write_cfg(tmp_path, text):
    path = tmp_path / "c.cfg"
    path.write_text(text)
    return str(path)


def test_default_types_come_from_the_file():
    cfg = load_config()
    assert cfg.batch_size == 0 and isinstance(cfg.batch_size, int)  # 0: auto, from the data
    assert cfg.learning_rate == pytest.approx(3e-3) and isinstance(cfg.learning_rate, float)
    assert cfg.flip_lr is True
    assert cfg.inception2 == (64, 96, 96, 64)
    assert cfg.optimizer == "adam"
    assert cfg.section == "default"


def test_section_overrides_default_and_flags_override_section():
    cfg = load_config("demo")
    assert cfg.image_size == 32 and cfg.flip_lr is False
    assert cfg.optimizer == "adam"  # untouched keys keep the default
    cfg = load_config("demo", {"image_size": "24", "flip_lr": "true", "learning_rate": "2e-3"})
    assert cfg.image_size == 24 and cfg.flip_lr is True and cfg.learning_rate == pytest.approx(2e-3)


def test_every_shipped_section_loads():
    import configparser
    parser = configparser.ConfigParser()
    parser.read(utils.DEFAULT_CONFIG)
    for section in parser.sections():
        assert load_config(section).section == section


@pytest.mark.parametrize("overrides, message", [
    ({"batch_sise": "3"}, "unknown config key 'batch_sise'"),
    ({"batch_size": "big"}, "'batch_size' must be an integer, got 'big'"),
    ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
    ({"flip_lr": "maybe"}, "'flip_lr' must be true or false"),
    ({"inception2": "1,x"}, "'inception2' must be a comma-separated list"),
    ({"batch_size": "-2"}, "'batch_size' must be >= 0"),
    ({"eval_batch_size": "0"}, "'eval_batch_size' must be > 0"),
    ({"max_steps": "-5"}, "'max_steps' must be > 0"),
    ({"optimizer": "lbfgs"}, "'optimizer' must be one of adam|adamw|sgd"),
    ({"keep_prob_dense": "1.5"}, "'keep_prob_dense' must be in (0, 1]"),
    ({"inception3": "1,2,3"}, "'inception3' must list 4 tower widths"),
])
def test_bad_override_names_the_key(overrides, message):
    with pytest.raises(UserError, match=None) as e:
        load_config("default", overrides)
    assert message in str(e.value)


def test_config_cfg_default_section_agrees_with_the_declarations():
    """config.cfg is what users read: its [default] lists every declared key with its declared default."""
    import configparser

    import config_keys
    parser = configparser.ConfigParser(default_section="__none__", inline_comment_prefixes=("#", ";"))
    parser.read(utils.DEFAULT_CONFIG)
    in_file = dict(parser["default"])
    assert sorted(in_file) == sorted(config_keys.KEYS)
    for name, key in config_keys.KEYS.items():
        assert utils._coerce(name, in_file[name], "config.cfg") == key.default, name
        assert key.help, name


def test_help_lists_every_key_with_a_default_the_command_line_reads_back():
    """--help of the scripts that take config keys lists each as `--key DEFAULT`, and that value
    given on the command line is the default again."""
    import config_keys
    import hw2_experiment
    import hw2_train
    for text in (hw2_train.build_parser().format_help(), hw2_experiment.build_parser().format_help()):
        listed = {line.split()[0][2:]: line.split()[1] for line in text.splitlines()
                  if line.startswith("  --") and line.split()[0][2:] in config_keys.KEYS}
        assert sorted(listed) == sorted(config_keys.KEYS)
        cfg = load_config("default", listed)
        # augment auto turns base where the user set scale_max or rotate_deg, as all of them are here.
        assert [name for name, key in config_keys.KEYS.items() if cfg[name] != key.default] == ["augment"]
        assert "\ntraining:\n  --batch_size 0 " in text and "--time_budget 0.0 " in text


def test_choices_come_from_the_modules_that_own_them():
    import hw2
    import layers
    import models
    import precision
    import schedules
    for key, owner in [("model", hw2.MODELS), ("lr_schedule", schedules.SCHEDULES), ("norm", models.NORMS),
                       ("precision", precision.PRECISIONS), ("conv_impl", layers.CONV_IMPLS)]:
        assert utils.load_config("default", {key: owner[-1]})[key] == owner[-1]
    assert set(models.ZOO) < set(hw2.MODELS)


def test_list_valued_keys_take_lists():
    cfg = load_config("default", {"conv_stack": "64,64", "inception2": "[8, 8, 8, 8]"})
    assert cfg.conv_stack == (64, 64) and cfg.inception2 == (8, 8, 8, 8)
    assert load_config("default", {"conv_stack": "32"}).conv_stack == (32,)


def test_a_saved_config_reads_back_with_its_types_and_new_keys_defaulted():
    import json
    cfg = load_config("tiny", {"conv_stack": "4,4"})
    saved = json.loads(json.dumps(cfg))  # what config.json holds: tuples became lists
    del saved["class_balance"]  # a key an older hw2 did not have
    back = utils.config_from_json(saved)
    assert back == cfg and back.conv_stack == (4, 4)


def test_a_saved_config_without_crop_mode_was_center_cropped():
    """An older hw2 had no crop_mode and always cropped the centre: its runs must evaluate so (a
    default other than center would need its own value for saved configs that lack the key)."""
    import json
    saved = json.loads(json.dumps(load_config("tiny", {"crop_mode": "squash"})))
    assert utils.config_from_json(saved).crop_mode == "squash"
    del saved["crop_mode"]
    assert utils.config_from_json(saved).crop_mode == "center"


def test_augment_auto_keeps_a_scale_or_rotation_the_user_chose(tmp_path):
    assert load_config().augment == "auto"
    assert load_config("default", {"rotate_deg": "0"}).augment == "base"  # chosen, though equal to the default
    assert load_config("default", {"scale_max": "1.3"}).augment == "base"
    assert load_config("default", {"augment": "strong", "rotate_deg": "5"}).augment == "strong"
    path = write_cfg(tmp_path, "[default]\n[photos]\nrotate_deg = 10\n[other]\nflip_ud = 0.5\n")
    assert load_config("photos", path=path).augment == "base"
    assert load_config("other", path=path).augment == "auto"


def _resolved(n_train, overrides):
    import run_dir
    cfg = load_config("default", {"image_size": "32", "batch_size": "8", **overrides})
    out = run_dir.resolve_auto(cfg, {"train": ["x.png"] * n_train})
    return out.augment, out.scale_max, out.rotate_deg


def test_augment_auto_is_strong_below_the_threshold_only():
    import config_keys
    from run_dir import AUTO_STRONG_BELOW
    assert f"strong below {AUTO_STRONG_BELOW:,} training images" in config_keys.KEYS["augment"].help  # --help
    assert _resolved(AUTO_STRONG_BELOW - 1, {}) == ("strong", 1.5, 20.0)
    assert _resolved(AUTO_STRONG_BELOW, {}) == ("base", 1.25, 0.0)
    assert _resolved(10, {"rotate_deg": "5"}) == ("base", 1.25, 5.0)  # the user's rotation stands
    assert _resolved(10**5, {"augment": "strong", "rotate_deg": "45"}) == ("strong", 1.5, 45.0)  # raised, never lowered
    assert _resolved(10, {"augment": "base"}) == ("base", 1.25, 0.0)


def test_a_batch_bigger_than_the_training_set_is_named_with_what_auto_would_pick(caplog):
    import run_dir
    with caplog.at_level("WARNING"):
        assert _resolved(200, {"batch_size": "512"})[0] == "strong"
        assert _resolved(512, {"batch_size": "512"})[0] == "strong"  # exactly one batch: no warning
    assert [r.getMessage() for r in caplog.records] == [
        "batch_size 512 is more than the 200 training images: every step repeats images, an epoch is one step "
        "(--batch_size 0 picks 16 for this folder)"]
    assert [run_dir.auto_batch_size(n) for n in (0, 200, 1000, 6400, 10**6)] == [16, 16, 32, 128, 128]


def test_unknown_section_lists_the_known_ones():
    with pytest.raises(UserError) as e:
        load_config("nope")
    assert "unknown section 'nope'" in str(e.value) and "demo" in str(e.value)


def test_unknown_key_in_a_section_names_section_and_key(tmp_path):
    path = write_cfg(tmp_path, "[default]\nbatch_size = 4\n[mine]\nbatchsize = 8\n")
    with pytest.raises(UserError) as e:
        load_config("mine", path=path)
    assert "[mine]" in str(e.value) and "'batchsize'" in str(e.value)


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    path = write_cfg(tmp_path, "[default]\nlearning_rate = 0.1\n")
    assert load_config("default", {"learning_rate": "1"}, path).learning_rate == 1.0


def test_missing_config_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config(path="/nonexistent/x.cfg")


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=2", "--c-d", "x"]) == {"a": "1", "b": "2", "c_d": "x"}
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--a"])
    with pytest.raises(UserError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_run_cli_turns_user_errors_into_one_line(capsys):
    def bad(argv):
        raise UserError("something the user can fix")
    assert utils.run_cli(bad, []) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: something the user can fix"
    with pytest.raises(UserError):
        utils.run_cli(bad, ["--debug"])


def test_run_cli_turns_a_file_the_os_refuses_into_one_line(tmp_path, capsys):
    """A results file that cannot be replaced (on Windows: open in Excel; here a folder in its place)
    ends the script with one line naming it, not a traceback."""
    (tmp_path / "per_class.csv").mkdir()

    def write(argv):
        (tmp_path / "new").write_text("x")
        os.replace(tmp_path / "new", tmp_path / "per_class.csv")
    assert utils.run_cli(write, [], tensorflow=False) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'per_class.csv'}: ")
    with pytest.raises(OSError):
        utils.run_cli(write, ["--debug"], tensorflow=False)


def test_names_the_console_cannot_encode_are_escaped_not_fatal(monkeypatch):
    """On Windows, output redirected to a file is cp1252: a Chinese class name printed there raised
    UnicodeEncodeError and ended the run."""
    import io
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    assert utils.run_cli(lambda argv: print("class 猫: 12 images") or 0, [], tensorflow=False) == 0
    out.flush()
    assert out.buffer.getvalue() == b"class \\u732b: 12 images" + os.linesep.encode()


def test_save_json_replaces_atomically(tmp_path):
    import run_dir
    path = str(tmp_path / "x.json")
    run_dir.save_json(path, {"a": (1, 2)})
    run_dir.save_json(path, {"a": [3]})
    assert run_dir.load_json(path, "x") == {"a": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_seed_section_is_the_seed_projects_recipe():
    """--section seed reproduces the seed report's training: whatever the defaults become."""
    cfg = load_config("seed")
    assert (cfg.image_size, cfg.batch_size, cfg.lr_schedule, cfg.warmup_epochs, cfg.label_smoothing) == \
        (100, 128, "plateau", 0.0, 0.0)
    assert (cfg.save_checkpoint_steps, cfg.checkpoint_minutes, cfg.precision, cfg.rotate_deg) == (500, 0, "fp32", 0.0)
    assert (cfg.augment, cfg.scale_max) == ("base", 1.25)
    assert (cfg.lr_patience, cfg.stop_patience, cfg.ema_decay, cfg.weight_decay, cfg.l2_on) == (7, 15, 0.999, 5e-4, "all")


def test_tensorflow_allocates_from_its_bfc_pool_unless_the_user_chose_malloc():
    """Importing utils selects TensorFlow's BFC CPU allocator (why: utils' comment); an explicit
    TF_CPU_ALLOCATOR_USE_BFC wins. Only a pool keeps the stats read here. TensorFlow's oneDNN ops
    are turned off in the children: where they are on (AVX-512 VNNI/bf16 CPUs) oneDNN's own
    allocator, a pool too, serves CPU tensors whatever the variable says."""
    import tensorflow as tf

    # utils was imported with this module, at collection, before any test ran an op
    tf.ones([512, 512]).numpy()
    assert tf.config.experimental.get_memory_info("CPU:0")["peak"] >= 512 * 512 * 4
    code = ("import utils, tensorflow as tf; tf.ones([512, 512]).numpy()\n"
            "try: tf.config.experimental.get_memory_info('CPU:0'); print('bfc')\n"
            "except ValueError: print('malloc')")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    for bfc, expected in ((None, "bfc"), ("false", "malloc")):
        child_env = dict(env, TF_ENABLE_ONEDNN_OPTS="0", **({"TF_CPU_ALLOCATOR_USE_BFC": bfc} if bfc else {}))
        out = subprocess.run([sys.executable, "-c", code], cwd=utils.HERE, env=child_env, capture_output=True,
                             text=True)
        assert out.stdout.split()[-1:] == [expected], (bfc, out.stderr[-2000:])
