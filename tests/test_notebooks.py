"""The Colab notebooks (colab/*.ipynb): each runs top to bottom in a fresh `python3` kernel with
smoke settings (TWIST_NOTEBOOK_SMOKE=1, a temporary working directory); the committed files carry
the outputs of one full-settings run (plots visible on GitHub), install from the clone they sit
in, and every results/ file their prose names is committed."""

import os
import pathlib
import re
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


PLOTTING = {"golden_tickets.ipynb", "theory.ipynb"}  # deploy.ipynb shows tables and text
MAX_NOTEBOOK_BYTES = 2_000_000  # PNG outputs at ~80 dpi keep a notebook well below this
RESULTS_PATH = re.compile(r"results/[\w./-]*\w")  # a committed file or folder named in prose


def code_cells(nb) -> list:
  return [c for c in nb.cells if c.cell_type == "code"]


def output_text(cell) -> str:
  return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                 for o in cell.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_full_run_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == KERNEL
  assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: outputs too large"
  code = code_cells(nb)
  counts = [c.execution_count for c in code]
  assert counts == list(range(1, len(code) + 1)), (
      f"{path.name}: execute it top to bottom in a fresh kernel before committing "
      f"(execution counts {counts})")
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{path.name}: committed with an error output"
  text = "".join(output_text(c) for c in code)
  assert "SMOKE=False" in text, f"{path.name}: the committed outputs must be a full-settings run"
  if path.name in PLOTTING:
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        f"{path.name}: no plot in the committed outputs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_installs_from_the_clone_and_reads_the_smoke_switch(path):
  nb = nbformat.read(path, as_version=4)
  code = [c.source for c in code_cells(nb)]
  assert "pip" in code[0] and '"install"' in code[0] and '"-e"' in code[0], (
      "the first code cell installs twist_jax from the clone (pip install -e ..)")
  everything = "\n".join(c.source for c in nb.cells)
  for placeholder in ("OWNER", "REPO_URL"):
    assert placeholder not in everything, f"{path.name}: placeholder {placeholder} left"
  assert any('os.environ.get("TWIST_NOTEBOOK_SMOKE") == "1"' in s for s in code), (
      "a settings cell must read TWIST_NOTEBOOK_SMOKE")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_results_named_in_prose_are_committed(path):
  nb = nbformat.read(path, as_version=4)
  prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
  missing = [m for m in RESULTS_PATH.findall(prose) if not (ROOT / m).exists()]
  assert not missing, f"{path.name} names results that are not in the repository: {missing}"


def test_install_cell_refuses_a_folder_that_is_not_a_clone(tmp_path):
  """The install cell, run where twist_jax is not importable and '..' is no clone, stops with an
  error naming the problem instead of installing something else."""
  nb = nbformat.read(ROOT / "colab" / "theory.ipynb", as_version=4)
  cell = code_cells(nb)[0].source
  work = tmp_path / "outside" / "colab"
  work.mkdir(parents=True)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  # -S: no site-packages, so the installed twist_jax is not importable either.
  done = subprocess.run([sys.executable, "-S", "-c", cell], cwd=work, env=env,
                        capture_output=True, text=True)
  assert done.returncode != 0
  assert "is not a twist_jax clone" in done.stderr


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
