"""Shared fixtures: 4 fake CPU devices, tiny models and sample images built once per session."""

import collections
import functools
import importlib.metadata
import os
import shutil
import sys
import tempfile


def compile_flags(jaxlib_version):
    """XLA:CPU flags that make the tests' many compiles cheaper without slowing the programs.

    The suite's time is mostly XLA compiling tiny models' programs. LLVM's level-1 pipeline
    compiles them ~20% faster and runs them as fast (level 0 compiles faster still but runs the
    steps ~35% slower). XLA:CPU's older elemental emitters, where this jaxlib still has them,
    compile the tiny train step in ~35% less CPU than its MLIR fusion emitters, with the same step
    time. XLA aborts on a flag it does not know, so that one is only passed to the jaxlib releases
    it was measured with. tests/test_golden.py holds the values either way.

        >>> compile_flags("0.10.2")
        '--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false'
        >>> compile_flags("0.11.0")
        '--xla_backend_optimization_level=1'
    """
    flags = ["--xla_backend_optimization_level=1"]
    if jaxlib_version.split(".")[:2] == ["0", "10"]:
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags)


# Must happen before jax is imported anywhere: tests see 4 CPU devices. Subprocesses inherit them.
COMPILE_FLAGS = compile_flags(importlib.metadata.version("jaxlib"))
TEST_XLA_FLAGS = f"--xla_force_host_platform_device_count=4 {COMPILE_FLAGS}"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for this session: training subprocesses reuse the programs
# the in-process runs compiled (the same step compiles in ~8 s on 2 cores).
# The process that makes the folder removes it at the end (xdist's workers inherit its path).
SESSION_CACHE_DIR = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    SESSION_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ti_flax_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import make_tiny_model  # noqa: E402

try:  # PyTorch's threads next to XLA's on 2 cores slow the interop tests 10x or more
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:
    pass

SAMPLE_IMAGES = os.path.join(ROOT, "scripts", "sample_images")


def build_clip_tokenizer(directory):
    """The real 49408-token CLIP tokenizer, built offline from the merges file ti_flax bundles."""
    return make_tiny_model.write_clip_tokenizer(str(directory))


@pytest.fixture(scope="session")
def _session_clip_tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture
def clip_tokenizer(_session_clip_tokenizer):
    """A fresh copy for each test: adding tokens in one test cannot leak into another."""
    import copy

    return copy.deepcopy(_session_clip_tokenizer)


# A test that needs a model folder loads a model and almost always compiles a step, and a model
# port's parity test (tests/test_port_*.py) compiles whole models: both are marked `slow` here,
# so `pytest -m "not slow"` is the quick inner loop.
MODEL_FIXTURES = {"tiny_model_dir", "tiny_vpred_model_dir", "tiny_sdxl_model_dir", "golden_run", "single_file_model",
                  "sd1_folder", "tiny_sdxl_single_file", "tiny_flux_dirs"}


# The files with the most seconds of work under `-n 2 --dist loadfile`, longest first (measured:
# each 1-2.5 minutes). xdist hands out whole files in collection order (pyproject.toml turns off
# its default of most-tests-first, which sent these few-test files out last): dealt out first, the
# short files that follow fill in around them and both workers finish close together, instead of
# one worker starting a 3-minute file while the other runs out of work.
LONGEST_FILES = [
    "test_golden.py", "test_checkpoint.py", "test_sdxl_train.py", "test_sdxl_paths.py", "test_train.py", "test_sharded.py",
    "test_speed.py", "test_generate.py", "test_notebook.py", "test_multihost.py", "test_port_unet.py", "test_faults.py",
    "test_gradients.py", "test_sdxl_sampling.py", "test_learning.py", "test_early_stopping_run.py",
]


def pytest_unconfigure(config):
    if SESSION_CACHE_DIR is not None:
        shutil.rmtree(SESSION_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name.startswith("test_port_"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def counting(function, counts):
    """`function`, counting each call in `counts[function.__name__]`: under jit or pmap, its traces."""

    @functools.wraps(function)
    def counted(*args, **kwargs):
        counts[function.__name__] += 1
        return function(*args, **kwargs)

    return counted


@pytest.fixture(scope="session", autouse=True)
def traces():
    """{"train_step": n, "sample_step": n, "validation_losses": n}: how many times the session has traced
    the train step, the sampler's step and the validation loss, for the compile-once guards
    (`before = traces["train_step"]`, run, compare).

    Each is wrapped in a counter for the whole session, before any is pmapped: pmapped_train_step and
    pmapped_sample_step (and their sharded_* counterparts, --shard_weights') look the module's function
    up when they build a program, and cache that program, so one wrapped part-way through would miss
    the traces of programs built before it.
    """
    from ti_flax.sampling import sampler
    from ti_flax.training import step

    counts = collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "train_step", counting(step.train_step, counts))
        patch.setattr(sampler, "sample_step", counting(sampler.sample_step, counts))
        patch.setattr(step, "validation_losses", counting(step.validation_losses, counts))
        step.pmapped_train_step.cache_clear()
        sampler.pmapped_sample_step.cache_clear()
        step.pmapped_validation_losses.cache_clear()
        step.sharded_train_step.cache_clear()  # --shard_weights' programs over a mesh look them up alike
        sampler.sharded_sample_step.cache_clear()
        step.sharded_validation_losses.cache_clear()
        yield counts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init SD-1.x-layout model folder (PyTorch safetensors, real CLIP tokenizer)."""
    return make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("tiny-sd")), seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory):
    """The same tiny model with a v_prediction scheduler (SD 2.x-768 style)."""
    return make_tiny_model.build_tiny_model(
        str(tmp_path_factory.mktemp("tiny-sd-v")), prediction_type="v_prediction", seed=1
    )


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    """A random-init StableDiffusionXLPipeline folder (scripts/make_tiny_model.py --layout tiny-sdxl):
    text encoders 32 and 48 wide (projection 16), "!" padding in tokenizer_2."""
    return make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("tiny-sdxl")), layout="tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tmp_path_factory):
    """(folder, file): a tiny SDXL folder whose every config value is one an SDXL single file implies
    (scripts/make_tiny_model.py --layout single-sdxl: 64-wide heads everywhere, SDXL base's sizes),
    and the same model as one original-layout .safetensors file (tests/original_layout.py)."""
    from original_layout import save_original, to_original

    folder = make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp("single-sdxl")), "single-sdxl")
    path = save_original(to_original(folder, "sdxl"), str(tmp_path_factory.mktemp("sdxl-file") / "sdxl.safetensors"))
    return folder, path


@pytest.fixture(scope="session")
def tiny_flux_dirs(tmp_path_factory):
    """{"dev": folder, "schnell": folder}: random-init FluxPipeline folders (make_tiny_model.py
    --layout flux-dev / flux-schnell: 128-wide heads whose RoPE axes add up to them, 2x2 packing,
    a 16-channel VAE, CLIP-L 64 wide, T5 32 wide with a SentencePiece tokenizer), built once."""
    return {variant: make_tiny_model.build_tiny_model(str(tmp_path_factory.mktemp(f"flux-{variant}")),
                                                      f"flux-{variant}")
            for variant in ("dev", "schnell")}


@pytest.fixture(scope="session")
def sample_images_dir():
    """The bundled sample images (PNG and JPEG, odd sizes)."""
    return SAMPLE_IMAGES


@pytest.fixture(scope="session")
def user_images_dir(tmp_path_factory):
    """User-style images: RGBA, grayscale, odd sizes, JPEG and PNG."""
    d = tmp_path_factory.mktemp("user_images")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (45, 61, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 33), dtype=np.uint8), "L").save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "c.jpeg")
    return str(d)


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def golden_run(request, tmp_path_factory):
    """(family, model folder, recorded golden values, values computed now) for tests/golden.py's
    SD 1.x and SD 2.x layouts; built and computed once per session."""
    import golden

    name = request.param
    model_dir = golden.build_model(name, str(tmp_path_factory.mktemp(f"golden-{name}")))
    want = dict(np.load(golden.golden_path(name)))
    return name, model_dir, want, golden.forward_values(model_dir)
