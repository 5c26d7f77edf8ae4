"""Checkpoints: save and restore a run's trainable state atomically, and find the latest one.

A checkpoint is `output_dir/checkpoint-{step}/` holding
  state.safetensors           the learned rows, every optimizer moment and count, the step
                              (and with --use_ema the rows' moving average);
  learned_embeds.safetensors  the rows in diffusers' layout (usable as they are; the EMA with --use_ema);
  meta.json                   step, tokens, run config, model fingerprint, batch geometry; with
                              --early_stopping dvar, "early_stopping": its criterion's history
                              (each evaluation's step and deterministic loss).
It is written under a hidden temporary name and renamed into place only when complete, so a
killed process never leaves a `checkpoint-N` that `latest` would pick. The frozen models are
never part of it: a checkpoint is a few kilobytes.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings

import jax
import numpy as np

from .. import files, formats
from ..config import TrainConfig
from ..config.flags import must_match
from ..errors import UserError, short_list

FORMAT_VERSION = 1
# Version 1 hashed diffusers' and transformers' config objects (before ti_flax owned its models);
# version 2 hashes ti_flax's own configs. A version-1 checkpoint still resumes, unchecked.
FINGERPRINT_VERSION = 2
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
EARLY_STOPPING = "early_stopping"  # meta.json's key for --early_stopping's history (early_stopping.DVAR.state)
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".checkpoint-"

# Settings that must match for a resume to continue the same run: each flag's resume decision,
# declared with the flag (config/train_config.py, flags.MATCH). Everything else (steps,
# checkpointing, saving, logging, validation, the optimizer's rates) may change on resume.
MUST_MATCH = must_match(TrainConfig)

# With --concepts, the MUST_MATCH settings each concept has its own of (the flags are only
# defaults then), and the concept's weight: a checkpoint records these per concept.
CONCEPT_MUST_MATCH = ("placeholder_token", "num_vectors", "learnable_property", "caption_extension", "repeats")
CONCEPT_META = (*CONCEPT_MUST_MATCH, "weight")


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir` as sorted [(step, path)]; warns about leftovers."""
    if not os.path.isdir(output_dir):
        return []
    found, leftovers = [], []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(path, META_FILE)) and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
        elif match or name.startswith(_TMP_PREFIX):
            leftovers.append(name)
    if leftovers:
        warnings.warn(
            f"ignoring incomplete checkpoint folder(s) in {output_dir}: {', '.join(sorted(leftovers))} "
            "(left by an interrupted save; safe to delete)",
            stacklevel=2,
        )
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def model_fingerprint(spec, table):
    """A short hash of the model's configs and token table: the same base model, wherever it lives.

    Each config is hashed as its `to_dict()` in sorted JSON, the text a ModelSpec once held in
    place of the config object, so checkpoints written then keep their fingerprint and resume.
    """
    digest = hashlib.sha256()
    texts = [json.dumps(config.to_dict(), sort_keys=True) for config in (spec.text, spec.denoiser, spec.vae)]
    texts += [spec.prediction_type, json.dumps(spec.text_2.to_dict(), sort_keys=True) if spec.text_2 else ""]
    for text in texts:
        digest.update(text.encode())  # (no second text encoder, SD 1.x / 2.x: "" adds nothing)
    digest.update(np.ascontiguousarray(np.asarray(table)[:: max(1, len(table) // 64)], np.float32).tobytes())
    return digest.hexdigest()[:16]


def _flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def embedding_files(meta, rows):
    """[(file name in the checkpoint, token, rows)]: learned_embeds.safetensors for one concept;
    with --concepts, <token>/learned_embeds.safetensors for each (as the run's own outputs). For
    SDXL (meta "text_widths") the file is the first of diffusers' pair, written with its partner."""
    if meta.get("concepts") is None:
        return [(formats.DIFFUSERS_FILE, meta["tokens"][0], rows)]
    out, start = [], 0
    for concept in meta["concepts"]:
        stop = start + concept["num_vectors"]
        token = concept["placeholder_token"]
        out.append((os.path.join(token, formats.DIFFUSERS_FILE), token, rows[start:stop]))
        start = stop
    return out


def save_checkpoint(output_dir, state, meta, family, total_limit=None):
    """Write `state` (a host-side TrainState) and `meta` as checkpoint-{step}; return its path.

    The rows are written as `family` (families.ModelFamily) writes a run's embedding, beside the
    state, so a checkpoint is usable as it is.

    The folder is written under a hidden temporary name, read back and compared with `state`
    (a checkpoint that does not read back is never renamed into place), then renamed: it
    appears under its final name only when complete. With `total_limit`, the oldest
    checkpoints beyond the limit are removed after the new one is in place. A failed write
    (disk full, read-only...) is `files.WriteFailed` naming the file; nothing is left behind.
    """
    step = int(state.step)
    final = checkpoint_dir(output_dir, step)
    flat = _flat(state)
    # The same step saved again (e.g. after a resume) replaces the folder already there.
    with files.staged_folder(final, f"{_TMP_PREFIX}{step}.tmp-{os.getpid()}") as tmp:
        with files.writing(os.path.join(final, STATE_FILE)):
            files.write_bytes(os.path.join(tmp, STATE_FILE), files.safetensors_bytes(flat))
        widths = meta.get("text_widths") or [np.shape(state.rows)[-1]]
        for name, token, rows in embedding_files(meta, state.output_rows):  # with --use_ema, the EMA
            with files.writing(os.path.join(final, name)):
                family.save_embedding(os.path.dirname(os.path.join(tmp, name)), token, rows, widths)
        with files.writing(os.path.join(final, META_FILE)):
            files.write_text(
                os.path.join(tmp, META_FILE), json.dumps({**meta, "step": step, "format_version": FORMAT_VERSION}, indent=2)
            )
        _fsync_tree(tmp)
        _verify_written(tmp, flat, final)
    if total_limit:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _verify_written(folder, flat, final):
    """Read a just-written checkpoint folder back; WriteFailed unless it holds what was written."""
    try:
        back = verify_checkpoint(folder)
    except UserError as err:
        raise files.WriteFailed(final, ValueError(f"it does not read back ({err})")) from None
    if set(back) != set(flat) or any(not np.array_equal(back[k], np.asarray(flat[k])) for k in flat):
        raise files.WriteFailed(final, ValueError("reading it back gave different values"))


def verify_checkpoint(path):
    """Read checkpoint folder `path` back: its meta.json and every tensor of its state file.

    Returns the state tensors; raises a UserError (`files.DamagedFile` for a damaged file)
    naming what does not read back.
    """
    meta = read_meta(path)
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("tokens"), list):
        raise files.DamagedFile(os.path.join(path, META_FILE), "not a ti_flax checkpoint's meta.json (no step or tokens)", None)
    return files.read_safetensors(os.path.join(path, STATE_FILE), advice=None)


def _fsync_tree(folder):
    for parent, _, names in os.walk(folder):  # a --concepts checkpoint has a folder per concept
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                os.fsync(f.fileno())


def read_meta(path):
    meta_file = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_file):
        raise UserError(f"{path}: not a ti_flax checkpoint (no {META_FILE})")
    return files.read_json(meta_file, "a ti_flax checkpoint's meta.json (JSON)", advice=None)


def load_checkpoint(path, template):
    """Restore a TrainState shaped like `template` from checkpoint folder `path`.

    Returns (state of numpy arrays, meta dict). UserError if a file does not read back, or if
    the saved optimizer state does not have the template's structure (for instance
    --max_grad_norm was switched on or off).
    """
    meta = read_meta(path)
    saved = files.read_safetensors(os.path.join(path, STATE_FILE), advice=None)
    want = _flat(template)
    if set(saved) != set(want) or any(saved[k].shape != want[k].shape for k in want):
        raise UserError(
            f"{path}: optimizer state does not match this run's optimizer "
            "(was --max_grad_norm, --num_vectors or --gradient_accumulation_steps changed?); resume with the original settings"
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = [saved[jax.tree_util.keystr(p)].astype(np.asarray(x).dtype) for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, restored), meta


def captions_fingerprint(captions):
    """A short hash of each image's caption ids (None for a run without captions): a resume
    with edited caption files would show other prompts than the uninterrupted run."""
    if captions is None:
        return None
    digest = hashlib.sha256()
    for i, ids in enumerate(captions):
        if ids is not None:
            digest.update(np.int64(i).tobytes() + np.ascontiguousarray(ids, np.int32).tobytes())
    return digest.hexdigest()[:16]


def run_meta(config, tokens, token_ids, fingerprint, global_batch, num_images, captions=None):
    """What a checkpoint records about its run, for the compatibility check on resume.

    `captions`: per image, its caption ids or None (TrainData.captions), or None without captions.
    """
    return {
        "tokens": list(tokens),
        "token_ids": list(token_ids),
        "model": config.pretrained_model_name_or_path,
        "model_fingerprint": fingerprint,
        "fingerprint_version": FINGERPRINT_VERSION,
        "global_batch_size": global_batch,
        "num_images": num_images,
        "captions": captions_fingerprint(captions),
        "config": json.loads(config.to_json()),
    }


def check_compatible(saved, current, path):
    """UserError listing every setting that differs between a checkpoint and this run."""
    diffs = []
    if saved.get("fingerprint_version", 1) != current["fingerprint_version"]:
        warnings.warn(
            f"{path} was written by an older ti_flax, whose model fingerprint this version cannot "
            f"recompute; resuming without checking that {current['model']} is the model it was trained on",
            stacklevel=2,
        )
    elif saved.get("model_fingerprint") != current["model_fingerprint"]:
        diffs.append(f"base model ({saved.get('model')} vs {current['model']})")
    for key in ("tokens", "global_batch_size", "num_images"):
        if saved.get(key) != current[key]:
            diffs.append(f"{key} ({saved.get(key)} vs {current[key]})")
    diffs += concept_diffs(saved.get("concepts"), current.get("concepts"))
    # Checkpoints from before captions have no "captions" (None: none were used).
    if saved.get("captions") != current.get("captions") and None not in (saved.get("captions"), current.get("captions")):
        diffs.append("the caption files' contents (edited since the checkpoint)")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # With --concepts these are each concept's own, compared above; the flags are only defaults.
    per_concept = CONCEPT_MUST_MATCH if current.get("concepts") is not None else ()
    for key in (k for k in MUST_MATCH if k not in per_concept):
        # A setting newer than the checkpoint was then at its default.
        a, b = saved.get("config", {}).get(key, defaults[key]), current["config"][key]
        if a != b:
            diffs.append(f"--{key} ({a} vs {b})")
    if diffs:
        raise UserError(f"cannot resume from {path}: it belongs to a different run: " + short_list(diffs, 4, "; ") + " (checkpoint vs now)")


def concept_meta(concept, num_images):
    """What a checkpoint records of one concepts.Concept: the settings that must match on resume."""
    return {**{k: getattr(concept, k) for k in CONCEPT_META}, "num_images": num_images}


def concept_diffs(saved, current):
    """The per-concept settings (--concepts) that differ, e.g. "<dog> repeats (100 vs 50)"."""
    if saved == current:
        return []
    if saved is None or current is None or len(saved) != len(current):
        count = lambda c: "no --concepts" if c is None else f"{len(c)} concepts"  # noqa: E731
        return [f"concepts ({count(saved)} vs {count(current)})"]
    return [f"{b['placeholder_token']} {key} ({a.get(key)} vs {b[key]})"
            for a, b in zip(saved, current) for key in b if a.get(key) != b[key]]


def resolve_resume(config):
    """The checkpoint folder to resume from, or None to start fresh (saying why).

    "latest" skips checkpoints that do not read back (one warning each, naming it) and takes the
    newest one that does; a damaged checkpoint named explicitly is a UserError naming it.
    """
    target = config.resume_from_checkpoint
    if not target:
        return None
    if target == "latest":
        checkpoints = list_checkpoints(config.output_dir)
        skipped = 0
        for _, path in reversed(checkpoints):
            try:
                verify_checkpoint(path)
            except files.DamagedFile as err:
                skipped += 1
                warnings.warn(f"--resume_from_checkpoint latest: skipping {path}: {err}", stacklevel=2)
                continue
            return path
        why = f"no checkpoint that reads back ({skipped} damaged)" if skipped else "no checkpoint"
        print(f"--resume_from_checkpoint latest: {why} in {config.output_dir}; starting fresh", flush=True)
        return None
    path = target if os.path.isdir(target) else os.path.join(config.output_dir, target)
    if not os.path.isdir(path):
        raise UserError(f"--resume_from_checkpoint {target}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise UserError(f"--resume_from_checkpoint {target}: incomplete or not a checkpoint (no {META_FILE})")
    try:
        verify_checkpoint(path)
    except files.DamagedFile as err:
        raise files.DamagedFile(
            err.path, err.problem, "a damaged checkpoint: resume from an earlier one, or from latest (it skips damaged ones)"
        ) from None
    return path
