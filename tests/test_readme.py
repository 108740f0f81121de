"""The README's Python example runs and prints what the README says it prints."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_api_example_prints_the_documented_cost(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    promised = re.search(r"prints `(\(\d+, \d+\))`", section).group(1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert promised in r.stdout
    for suffix in (".pt", ".torchscript.pt", ".json"):
        assert (tmp_path / f"vgg16_half{suffix}").is_file()
    assert "13 channel groups, 9 connection units" in code
    check = ("import torch, evoprune\nfrom evoprune.models import vgg16_bn_cifar\n"
             "s = evoprune.PruningSpace.from_model(vgg16_bn_cifar(), torch.randn(1, 3, 32, 32))\n"
             "print(len(s.groups), len(s.units))")
    r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["13", "9"], r.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the test suite", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command == "python -m pytest"
    assert "\npython -m pytest\n" in ci
