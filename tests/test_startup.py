"""A run's start: the persistent compilation cache, the step compiled ahead, and what the summary
says it cost (load and compile seconds, peak device memory where the backend reports it)."""

import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from ti_flax import TrainConfig, UserError, train
from ti_flax.config import cli
from ti_flax.training import compile_cache, logs, step as step_lib

CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                 *compile_cache.THRESHOLDS)
JAX_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE",
           *(name.upper() for name in compile_cache.THRESHOLDS))


@pytest.fixture
def fresh_env(tmp_path, monkeypatch):
    """No JAX cache variables, XDG_CACHE_HOME and HOME under tmp_path; jax's cache options put back
    afterwards, so other tests in this process keep the session's cache."""
    saved = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    for name in JAX_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield tmp_path / "xdg" / "ti_flax" / "jax_cache"
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_cache_dir_rule():
    assert compile_cache.cache_dir({"HOME": "/home/me"}) == "/home/me/.cache/ti_flax/jax_cache"
    assert compile_cache.cache_dir({"HOME": "/home/me", "XDG_CACHE_HOME": "/scratch"}) == "/scratch/ti_flax/jax_cache"
    # The XDG spec ignores a relative XDG_CACHE_HOME; an empty one is unset.
    for xdg in ("relative/cache", ""):
        assert compile_cache.cache_dir({"HOME": "/h", "XDG_CACHE_HOME": xdg}) == "/h/.cache/ti_flax/jax_cache"
    # JAX's own variable wins: ti_flax chooses no folder.
    assert compile_cache.cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/x", "JAX_COMPILATION_CACHE_DIR": "/j"}) is None


def test_configure_uses_our_folder_and_thresholds(fresh_env, monkeypatch):
    assert compile_cache.configure() == str(fresh_env) and fresh_env.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(fresh_env) and jax.config.jax_enable_compilation_cache
    for name, value in compile_cache.THRESHOLDS.items():
        assert getattr(jax.config, name) == value
    # JAX's variables are respected: its folder, and a threshold set through its variable.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
    jax.config.update("jax_compilation_cache_dir", "/elsewhere")  # what jax read from it at import
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    assert compile_cache.configure() == "/elsewhere"
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 5.0


def test_configure_off_and_on_again(fresh_env):
    assert compile_cache.configure(enabled=False) is None
    assert not jax.config.jax_enable_compilation_cache and not fresh_env.exists()
    assert compile_cache.configure() == str(fresh_env) and jax.config.jax_enable_compilation_cache


def test_unwritable_cache_folder_warns_and_trains_without(fresh_env, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the folder should go
    with pytest.warns(UserWarning, match="compilation cache off"):
        assert compile_cache.configure() is None
    assert not jax.config.jax_enable_compilation_cache


def test_no_compilation_cache_flag_turns_it_off(fresh_env, monkeypatch):
    args = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
            "--initializer_token", "toy"]
    assert cli.parse_config(args).no_compilation_cache is False
    assert cli.parse_config(args + ["--no_compilation_cache"]).no_compilation_cache is True
    # train() sets the cache up before it loads anything: a missing model fails after.
    config = TrainConfig.tiny(str(fresh_env.parent / "no-such-model"), "images", "out", no_compilation_cache=True)
    with pytest.raises(UserError):
        train(config)
    assert not jax.config.jax_enable_compilation_cache and not fresh_env.exists()


def test_peak_bytes_and_startup_line():
    gib = 2**30
    stats = [None, {"bytes_in_use": 1}, {"peak_bytes_in_use": 3 * gib}, {"peak_bytes_in_use": gib}]
    assert logs.peak_bytes(stats) == 3 * gib
    assert logs.peak_bytes([None, {}]) is None
    timings = {"load_model_s": 3.14, "compile_step_s": 12.37, "peak_device_bytes": None}
    assert logs.startup_text(timings) == "loaded model in 3.1 s; compiled step in 12.4 s"
    with_memory = logs.startup_text({**timings, "peak_device_bytes": int(7.25 * gib)})
    assert with_memory.endswith("; peak device memory 7.25 GiB")
    assert logs.startup_text({**timings, "compile_step_s": None}) == "loaded model in 3.1 s"
    assert logs.peak_device_bytes(jax.local_devices(backend="cpu")[:2]) is None  # CPU reports no memory stats


def test_run_compiles_once_into_the_cache_and_reports_startup(fresh_env, tiny_model_dir, sample_images_dir, tmp_path,
                                                               capsys, traces):
    step_lib.pmapped_train_step.cache_clear()  # so this run compiles its step, into the new folder
    before = traces["train_step"]
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "o"), max_train_steps=3)
    result = train(config, devices=jax.local_devices()[:2])
    assert traces["train_step"] - before == 1  # compiled ahead, then 3 steps, one trace
    assert os.listdir(fresh_env), "no compiled program was written to the cache"
    out = capsys.readouterr().out
    summary = out[out.index("done: step 3"):]
    assert "loaded model in " in summary and "compiled step in " in summary
    assert "peak device memory" not in summary  # CPU does not report it
    assert result.timings["peak_device_bytes"] is None
    assert result.timings["load_model_s"] > 0 and result.timings["compile_step_s"] > 0
