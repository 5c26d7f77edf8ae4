"""scripts/colab_tpu.ipynb runs top to bottom with TINY = True, on CPU, in bounded time.

The notebook is executed as Jupyter would run it after opening it from scripts/ (the kernel's
working folder is scripts/), in a kernel on this interpreter, with TINY and WORKDIR set by a
cell added after its "parameters" cell (papermill's convention).
"""

import json
import os
import sys
import time

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from ti_flax.formats import read_embedding

pytestmark = pytest.mark.slow  # runs the whole notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "scripts", "colab_tpu.ipynb")
CELL_TIMEOUT = 300  # seconds; the whole notebook takes about a minute on 2 CPU cores
KERNEL = "ti_flax_test_python"


def kernel_on_this_interpreter(root):
    """A kernel spec that starts ipykernel with sys.executable, found first through JUPYTER_PATH."""
    folder = root / "kernels" / KERNEL
    folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ti_flax test kernel",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    return str(root)


def with_parameters(nb, **values):
    """Insert a cell assigning `values` after the cell tagged "parameters"."""
    (index,) = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def execute(tmp_path_factory, request, **parameters):
    """(executed notebook, its WORKDIR, seconds) of a TINY run with `parameters` injected."""
    base = tmp_path_factory.mktemp("notebook")
    workdir = base / "work"
    monkeypatch = pytest.MonkeyPatch()
    request.addfinalizer(monkeypatch.undo)
    monkeypatch.setenv("JUPYTER_PATH", kernel_on_this_interpreter(base / "jupyter"))
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY=True, WORKDIR=str(workdir), **parameters)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={"metadata": {"path": os.path.join(ROOT, "scripts")}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(base / "executed.ipynb"))  # kept for reading a failure
    return nb, workdir, time.perf_counter() - start


@pytest.fixture(scope="module")
def executed(tmp_path_factory, request):
    return execute(tmp_path_factory, request)


def outputs(nb, cell_text):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and cell_text in c.source]
    return cell.outputs


def png_outputs(cell_outputs):
    return [o for o in cell_outputs if o.output_type == "display_data" and "image/png" in o.data]


def text_of(cell_outputs):
    return "".join(o.get("text", "") for o in cell_outputs if o.output_type == "stream")


def test_every_cell_runs_without_error(executed):
    # (Each cell has CELL_TIMEOUT: a hang fails here instead of stalling CI. How long the
    # notebook takes is printed, not asserted: it depends on the machine and the compile cache.)
    nb, _, seconds = executed
    print(f"the TINY notebook took {seconds:.0f} s")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]


def test_training_wrote_the_embedding_checkpoints_and_validation_images(executed):
    _, workdir, _ = executed
    out = workdir / "output"
    emb = read_embedding(str(out / "learned_embeds.safetensors"))
    assert emb.token == "<my-concept>" and emb.rows.shape == (2, 32) and np.all(np.isfinite(emb.rows))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == sorted(
        f"step-{s:06d}{suffix}.png" for s in (3, 6) for suffix in ("", "-0", "-1")
    )
    assert sorted(p.name for p in (workdir / "images").iterdir()) == sorted(
        os.listdir(os.path.join(ROOT, "scripts", "sample_images"))
    )


def test_fit_cell_reports_the_step_memory_before_training(executed):
    # The "will it fit" cell compiles the settings' step for the runtime's chip (here the CPU,
    # which reports no memory limit) and prints the plan before any weights are loaded.
    nb, _, _ = executed
    text = text_of(outputs(nb, "ti_flax.plan(config)"))
    assert "ti_flax.plan: " in text and "at 32 px, 1 per chip" in text
    assert "memory per chip" in text and "total" in text and "work per step" in text
    assert "Does not fit" not in text  # the CPU has no limit to exceed


def test_training_cell_shows_progress_and_validation_images_inline(executed):
    nb, _, _ = executed
    cell = outputs(nb, "ti_flax.train(config")
    text = text_of(cell)
    assert "train: 100%" in text and "6/6" in text  # tqdm's bar
    assert "step 3: a photo of <my-concept>" in text and "step 6: a photo of <my-concept>" in text
    assert len(png_outputs(cell)) == 2  # one strip of 2 validation images per validation
    assert "final loss" in text


def test_export_cell_writes_every_format_and_a_zip(executed):
    import zipfile

    _, workdir, _ = executed
    export = workdir / "export"
    rows = read_embedding(str(workdir / "output" / "learned_embeds.safetensors")).rows
    diffusers = read_embedding(str(export / "learned_embeds.safetensors"))
    a1111 = read_embedding(str(export / "my-concept.pt"))  # torch is installed in the test environment
    comfy = read_embedding(str(export / "comfyui" / "my-concept.safetensors"))
    assert (diffusers.format, diffusers.token) == ("diffusers", "<my-concept>")
    assert (a1111.format, a1111.token) == ("a1111", "my-concept")
    assert comfy.format == "kohya"
    for emb in (diffusers, a1111, comfy):
        np.testing.assert_array_equal(emb.rows, rows)
    with zipfile.ZipFile(workdir / "my-concept-embeddings.zip") as z:
        assert sorted(z.namelist()) == ["comfyui/", "comfyui/my-concept.safetensors", "learned_embeds.safetensors",
                                        "my-concept.pt"]


def test_generate_cell_writes_and_shows_two_images(executed):
    nb, workdir, _ = executed
    generated = sorted(p.name for p in (workdir / "generated").iterdir())
    assert generated == ["000.png", "001.png"]
    assert Image.open(workdir / "generated" / "000.png").size == (32, 32)
    assert len(png_outputs(outputs(nb, "ti_flax.generate("))) == 1



def test_sdxl_choice_trains_exports_sdxl_files_and_generates(tmp_path_factory, request):
    # The settings' SDXL choice (here the tiny SDXL-layout model): the same cells train, validate,
    # export diffusers' pair and the {clip_l, clip_g} file, and generate.
    nb, workdir, _ = execute(tmp_path_factory, request, TINY_SDXL=True)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]
    rows = read_embedding(str(workdir / "output")).rows  # the run's pair
    export = workdir / "export"
    assert sorted(p.name for p in export.iterdir()) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                                        "my-concept.safetensors"]
    for emb in (read_embedding(str(export / "learned_embeds.safetensors")),
                read_embedding(str(export / "my-concept.safetensors"))):
        assert len(emb.parts) == 2 and emb.rows.shape == (2, 32)
        np.testing.assert_array_equal(emb.rows, rows)
    assert len(png_outputs(outputs(nb, "ti_flax.train(config"))) == 2  # validation strips at steps 3 and 6
    assert sorted(p.name for p in (workdir / "generated").iterdir()) == ["000.png", "001.png"]
