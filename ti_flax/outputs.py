"""What a finished run writes: the final embedding, the model card, the full pipeline, the Hub upload."""

import os

from . import checkpoint as ckpt
from . import files, formats, model_card


def save_outputs(run, rows, history, grid=None):
    """Write the final embedding, model card (and pipeline, and Hub upload) for a finished run.

    A failed write is `files.WriteFailed` naming, besides the file, what was already saved
    (files of this call, the newest checkpoint): those stay intact.
    """
    config = run.config
    written = {}
    try:
        widths = run.model.spec.text_widths
        for learned in run.learned:  # each concept's files in its folder (a single concept: output_dir)
            suffix = "" if config.concepts is None else f" {learned.tokens[0]}"
            saved = formats.save_trained(learned.out_dir, learned.tokens[0], rows[learned.rows], widths,
                                         bin=config.no_safe_serialization)
            written.update({kind + suffix: path for kind, path in saved.items()})
        if config.save_as_full_pipeline:
            written["pipeline"] = save_pipeline(run, rows)
        written["model_card"] = model_card.write_model_card(config, run.tokens, history, written, grid, run.learned,
                                                               run.is_sdxl)
    except files.WriteFailed as err:
        saved = list(written.values())
        checkpoints = ckpt.list_checkpoints(config.output_dir)
        if checkpoints:
            saved.append(checkpoints[-1][1])
        raise err.with_saved(saved) from None
    if config.push_to_hub:
        written["hub"] = push_to_hub(config)
    return written


def save_pipeline(run, rows):
    """Save the full Flax pipeline into output_dir, via a temporary folder moved into place."""
    out = run.config.output_dir
    # output_dir holds the run's other files: each component is moved in beside them.
    with files.staged_folder(out, f".pipeline-{os.getpid()}", merge=True, what="the full pipeline into") as tmp:
        formats.save_pipeline(run.model, run.model.tokenizer, rows, tmp)
    return out


def push_to_hub(config):
    from huggingface_hub import create_repo, upload_folder

    token = config.hub_token or (True if config.use_auth_token else None)
    repo_id = config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=config.output_dir,
        token=token,
        commit_message="Upload textual inversion embedding trained with ti_flax",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*"],
    )
    return repo_id
