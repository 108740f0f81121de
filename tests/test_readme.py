"""Every code block of README.md runs as written.

Blocks run in README order in one scratch directory laid out like a checkout (``examples/`` and ``../shared``
beside it), so a block may use what an earlier one wrote (the deployment snippet loads the demo's output).

* ```python blocks run as scripts, each in a fresh interpreter.
* ```bash blocks run command by command: ``evoprune ...`` and ``python examples/...`` commands run for real;
  ``pip install`` lines are checked against pyproject's extras (installing would change the test's own venv);
  ``python -m pytest`` must be the command ``.ci/run`` runs (running it here would recurse).
* A block preceded by ``<!-- readme-test: parse -->`` holds runs of hours: its commands are parsed by the real
  parsers and settings checks (so every flag and value must be valid), not run. ``<!-- readme-test: smoke -->``
  marks the CIFAR smoke run (real data from ../shared, slow). ``<!-- readme-test: slurm -->`` runs the SLURM
  script's shell lines with a stand-in ``scontrol`` and parses its scoop command. ``<!-- readme-test: jobqueue -->``
  runs the dask-jobqueue script with a stand-in ``dask_jobqueue`` whose ``SLURMCluster`` is a 2-worker
  ``LocalCluster`` (everything but SLURM is real).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mode>[\w-]+) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def blocks(lang=None, mode=None):
    out = []
    for m in BLOCK.finditer(README):
        if (lang is None or m["lang"] == lang) and (m["mode"] or "run") == (mode or "run"):
            out.append(m["code"])
    return out


def commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A scratch checkout: ``repo/examples`` links to the real examples, ``shared`` to ../shared."""
    base = tmp_path_factory.mktemp("readme")
    repo = base / "repo"
    repo.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    if SHARED.exists():
        (base / "shared").symlink_to(SHARED)
    return repo


def env():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, EVOPRUNE_PROGRESS="0", OMP_NUM_THREADS="2")


def run_command(cmd: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    if argv[0] == "evoprune":
        argv = [sys.executable, "-m", "evoprune"] + argv[1:]
    elif argv[0] == "python":
        argv[0] = sys.executable
    r = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "FAILED" not in r.stderr, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def parse_command(cmd: str) -> None:
    """Parse a command with the real parser and settings checks, without running it."""
    from evoprune.cli import job
    argv = shlex.split(cmd)
    if argv[:3] == ["python", "-m", "scoop"]:
        argv = argv[3:]
        while argv and argv[0].startswith("-"):  # scoop's own options: -n N, --hostfile FILE
            argv = argv[2:]
    else:
        assert argv[0] == "python", cmd
        argv = argv[1:]
    script, flags = argv[0], argv[1:]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _common
        args = _common.parser("README check", None).parse_args(flags)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    job.options_from_args(args)  # the settings' own checks


def check_pip(cmd: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    for name in re.findall(r"\.\[(\w+)\]", cmd):
        assert name in extras, f"README installs the extra [{name}], pyproject has {sorted(extras)}"
    assert cmd.startswith("pip install "), cmd


def test_readme_test_command_is_what_ci_runs():
    block = README.split("Run the test suite", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command == "python -m pytest"
    assert "\npython -m pytest\n" in ci


@pytest.mark.slow
def test_every_runnable_block_runs_as_written(checkout):
    """Python snippets and evoprune commands, in README order, in one scratch checkout."""
    ran = []
    for m in BLOCK.finditer(README):
        if m["mode"]:
            continue
        if m["lang"] == "python":
            script = checkout / f"readme_block_{len(ran)}.py"
            script.write_text(m["code"])
            r = run_command(f"python {script.name}", checkout)
            ran.append(("python", r.stdout))
        elif m["lang"] == "bash":
            for cmd in commands(m["code"]):
                if cmd.startswith("pip install"):
                    check_pip(cmd)
                elif cmd == "python -m pytest":
                    continue  # test_readme_test_command_is_what_ci_runs
                else:
                    ran.append((cmd, run_command(cmd, checkout).stdout))
    assert any(cmd.startswith("evoprune demo") for cmd, _ in ran)
    assert sum(kind == "python" for kind, _ in ran) >= 3
    # the Python API block prints the cost the README promises
    section = README.split("## Python API", 1)[1]
    promised = re.search(r"prints `(\(\d+, \d+\))`", section).group(1)
    assert any(promised in out for kind, out in ran if kind == "python")
    # the composable search loop runs to the target it promises
    loop = re.search(r"prints `(\d+ rounds: \d+ % of the MACs)`", section).group(1)
    assert any(loop in out for kind, out in ran if kind == "python"), loop
    for suffix in (".pt", ".pt2", ".json"):
        assert (checkout / f"vgg16_half{suffix}").is_file()


def test_long_runs_parse_with_the_real_parsers():
    cmds = [c for code in blocks("bash", "parse") for c in commands(code)]
    assert len(cmds) >= 3
    for cmd in cmds:
        parse_command(cmd)


def test_slurm_script_writes_a_scoop_hostfile(tmp_path):
    (code,) = blocks("bash", "slurm")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node1\\nnode2\\n'\n")
    (fake / "scontrol").chmod(0o755)
    shell = [c for c in commands(code) if not c.startswith("python ")]
    e = dict(env(), PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
             SLURM_NTASKS_PER_NODE="8")
    for cmd in shell:
        subprocess.run(cmd, shell=True, cwd=tmp_path, env=e, check=True, timeout=30)
    assert (tmp_path / "hosts.txt").read_text().split("\n")[:2] == ["node1 8", "node2 8"]
    for cmd in commands(code):
        if cmd.startswith("python "):
            parse_command(cmd)


FAKE_JOBQUEUE = """
import distributed


class SLURMCluster(distributed.LocalCluster):
    \"\"\"Stands in for dask_jobqueue.SLURMCluster: two local one-thread workers, no SLURM.\"\"\"

    def __init__(self, **kwargs):
        assert {"cores", "processes", "memory", "walltime"} <= set(kwargs), kwargs
        super().__init__(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)

    def scale(self, n=None, jobs=0, **kwargs):
        if not jobs:  # the cluster scales itself to 0 when it closes
            return super().scale(n or 0, **kwargs)
        self.jobs_asked = jobs  # the real one submits that many batch jobs
"""


@pytest.mark.slow
def test_dask_jobqueue_script_runs_on_a_local_cluster(tmp_path):
    pytest.importorskip("distributed", reason="the dask extra is in [dev]; CI installs it")
    (code,) = blocks("python", "jobqueue")
    (tmp_path / "dask_jobqueue.py").write_text(FAKE_JOBQUEUE)
    (tmp_path / "search_on_slurm.py").write_text(code)
    e = dict(env(), PYTHONPATH=os.pathsep.join([str(tmp_path), env()["PYTHONPATH"]]))
    r = subprocess.run([sys.executable, "search_on_slurm.py"], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.search(r"1 round on 2 Dask workers: (\d+) % of the MACs", r.stdout)
    assert found and 40 <= int(found.group(1)) <= 50, r.stdout + r.stderr[-2000:]  # the target, 0.5, is met


@pytest.mark.slow
def test_cifar_smoke_run_finishes_and_writes_its_files(checkout, check_round_files):
    """The quick start's smoke run on the shared CIFAR-10 data and VGG16 teacher, as written."""
    assert SHARED.exists(), "../shared (CIFAR-10 and the teachers) must sit beside the repository"
    (code,) = blocks("bash", "smoke")
    (cmd,) = commands(code)
    run_command(cmd, checkout, timeout=1200)
    out = checkout / re.search(r"--out (\S+)", cmd).group(1)
    check_round_files(out, 1)
    assert "| 1 |" in (out / "report.md").read_text()
