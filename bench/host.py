"""Facts about the host a benchmark ran on. Imports no JAX, so gpu_check's driver can use it
before (and without) configuring JAX."""

import os
import subprocess


def load_info() -> dict:
  """`uptime`'s line and the 1/5/15-minute load averages: whether the host was busy."""
  try:
    line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    line = f"uptime failed: {e}"
  return {"uptime": line, "loadavg": list(os.getloadavg()), "cpu_count": os.cpu_count()}
