"""Every notebook runs top to bottom (in order: 01 trains the example model the others reuse). Notebooks with a
``REAL`` switch run on the real MedMNIST test images with the shipped model where the official files are
found, and on the embedded data always (``REAL = False``)."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
SWITCH = "REAL = None"


def _variants():
    from medexplore.experiments.showcase import official_medmnist_root

    real = official_medmnist_root() is not None
    for path in NOTEBOOKS:
        switched = SWITCH in path.read_text()
        yield pytest.param(path, not switched, id=path.stem)
        if switched and real:
            yield pytest.param(path, True, id=f"{path.stem}-real")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) == 6
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert any(c.cell_type == "markdown" for c in book.cells), f"{path.name} explains nothing"


@pytest.mark.slow
@pytest.mark.parametrize("path,real", list(_variants()))
def test_notebook_runs(path, real, workdir):
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    if not real:  # the embedded data, even where the MedMNIST files are found
        for cell in book.cells:
            cell.source = cell.source.replace(SWITCH, "REAL = False")
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures or path.stem == "04_umap_explorer", f"{path.name} drew no figure"
