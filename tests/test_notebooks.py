"""The Colab notebooks (colab/*.ipynb): each runs top to bottom in a fresh `python3` kernel with
smoke settings (TWIST_NOTEBOOK_SMOKE=1, a temporary working directory), and the committed files
carry no outputs or execution counts."""

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"golden_tickets.ipynb", "theory.ipynb", "deploy.ipynb"}
KERNEL = "python3"
CELL_TIMEOUT_S = 600  # generous: a smoke cell takes seconds, but CI machines vary


def test_every_notebook_is_collected():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == KERNEL
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}, cell {i}: clear the outputs before committing")
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert "REPO_URL" in code[0], "the first code cell installs twist_jax (Colab)"
  assert any('os.environ.get("TWIST_NOTEBOOK_SMOKE") == "1"' in s for s in code), (
      "a settings cell must read TWIST_NOTEBOOK_SMOKE")


@pytest.fixture(scope="session")
def kernel_name():
  """A `python3` kernelspec, installed for the current user if Jupyter cannot find one."""
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

  try:
    KernelSpecManager().get_kernel_spec(KERNEL)
  except NoSuchKernel:
    subprocess.check_call([sys.executable, "-m", "ipykernel", "install", "--user",
                           "--name", KERNEL])
  return KERNEL


def kernel_env() -> dict:
  """The test process's environment with smoke settings, this checkout's twist_jax first on the
  path (whatever copy is installed), and without conftest's 8 fake devices: a notebook should
  see the devices a user's session sees."""
  env = dict(os.environ, TWIST_NOTEBOOK_SMOKE="1")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, kernel_name):
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=kernel_env())  # CellExecutionError (with the traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
