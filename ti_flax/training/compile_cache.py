"""JAX's persistent compilation cache, on by default: a rerun with the same settings loads its
compiled programs from disk instead of compiling them again (a minute or more for SD's step).

The folder is `$XDG_CACHE_HOME/ti_flax/jax_cache` (default `~/.cache/ti_flax/jax_cache`). JAX's own
environment variables win over ti_flax's choices: with `JAX_COMPILATION_CACHE_DIR` set, its folder
is used, and a threshold set through its `JAX_PERSISTENT_CACHE_*` variable is kept.

    >>> cache_dir({"HOME": "/home/me"})
    '/home/me/.cache/ti_flax/jax_cache'
    >>> cache_dir({"HOME": "/home/me", "XDG_CACHE_HOME": "/scratch/cache"})
    '/scratch/cache/ti_flax/jax_cache'
    >>> cache_dir({"JAX_COMPILATION_CACHE_DIR": "/data/jax"}) is None  # JAX's setting rules
    True
"""

import os
import warnings

DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
ENABLE_ENV = "JAX_ENABLE_COMPILATION_CACHE"
# Every program is written, however quick to compile or small: JAX's default skips programs that
# compile in under a second, which on a fast host can be the tiny model's whole step, and a run's
# other programs (latent encoding, sampling, the small collectives) add up on a rerun too.
THRESHOLDS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,  # -1: no size limit, and JAX may not raise it
}


def cache_dir(environ=None):
    """The folder ti_flax gives JAX's cache, or None where `JAX_COMPILATION_CACHE_DIR` names one.

    Args:
      environ: the environment to read (default os.environ): JAX_COMPILATION_CACHE_DIR,
        XDG_CACHE_HOME (used when absolute, as the XDG spec says), HOME.
    Returns:
      `$XDG_CACHE_HOME/ti_flax/jax_cache`, else `$HOME/.cache/ti_flax/jax_cache`, else None.
    """
    environ = os.environ if environ is None else environ
    if environ.get(DIR_ENV):
        return None
    return os.path.join(cache_root(environ), "jax_cache")


def cache_root(environ=None):
    """ti_flax's cache folder: `$XDG_CACHE_HOME/ti_flax` (when absolute, as the XDG spec says),
    else `$HOME/.cache/ti_flax`. JAX's programs go in its `jax_cache`, ti_flax.plan's answers in `plans`.

        >>> cache_root({"HOME": "/home/me"})
        '/home/me/.cache/ti_flax'
    """
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ti_flax")


def configure(enabled=True, environ=None):
    """Turn JAX's persistent compilation cache on (in `cache_dir`) or off for this process.

    Call it before compiling anything; a later call with another folder or setting takes effect
    for the programs compiled after it.

    Args:
      enabled: False (`--no_compilation_cache`) turns the cache off, whatever JAX was told.
      environ: the environment to read (default os.environ).
    Returns:
      The folder in use, or None when the cache is off.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    environ = os.environ if environ is None else environ
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    folder = cache_dir(environ) if enabled else None
    if folder is not None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:  # a read-only home: train without the cache rather than fail
            warnings.warn(f"compilation cache off: cannot create {folder}: {err.strerror}", stacklevel=2)
            enabled, folder = False, None
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
    elif ENABLE_ENV not in environ:  # ours to turn back on (e.g. after a run with the flag)
        jax.config.update("jax_enable_compilation_cache", True)
    for name, value in THRESHOLDS.items():
        if name.upper() not in environ:
            jax.config.update(name, value)
    # JAX opens its cache once per process, at the first compile: make it reopen with the new
    # folder or setting.
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache) != before:
        compilation_cache.reset_cache()
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir
