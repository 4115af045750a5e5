"""Write the install locks: exact versions of every package `make run` / `make test` install.

    python scripts/lock.py            # resolve the newest releases, write locks/py3.1X.txt

One file per Python version (3.10, 3.11, 3.12; Linux x86-64), used by scripts/install.sh as a
pip constraints file, so every install of the project resolves to the same versions until the
lock is refreshed on purpose (`make lock`, which also runs a smoke test in a fresh venv).

torch and triton are not in the lock: install.sh installs torch==2.13.0 (CPU) and triton==3.7.1,
or keeps a CUDA torch that is already there; a pin here would replace that CUDA torch. The
packages torch itself needs (sympy, networkx, ...) are locked.

pip resolves for another Python version (`--python-version`) by wheel tags and Requires-Python,
but evaluates environment markers (`exceptiongroup; python_version < "3.11"`) for the Python
running it. So each version's closure is completed here: markers are evaluated for the target
version, and any package the target needs but the resolve left out is added to the request and
resolved again, until nothing is missing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
TORCH = "torch==2.13.0"  # read only for the packages it needs; itself kept out of the lock
NOT_LOCKED = ("torch", "triton")
NOT_LOCKED_PREFIXES = ("nvidia-", "cuda-")  # the CUDA build's libraries (the lock serves the CPU build)
OURS = {"spell", "spell-kernels"}


def lock_path(python: str) -> Path:
    return LOCKS / f"py{python}.txt"


def project_requirements() -> list[str]:
    """The engine's and the kernel library's dependencies, with every extra (test included)."""
    reqs: list[str] = []
    for pyproject in (REPO / "pyproject.toml", REPO / "kernels" / "pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        reqs += project["dependencies"]
        for extra in project.get("optional-dependencies", {}).values():
            reqs += extra
    return [r for r in reqs if canonicalize_name(Requirement(r).name) not in OURS]


def target_environment(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython", platform_python_implementation="CPython")
    return env


def pip_resolve(python: str, requirements: list[str]) -> dict[str, dict]:
    """name -> the report's metadata of each package pip would install for `python`."""
    tag = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), "--target", str(Path(tmp) / "t"),
               "--python-version", python, "--implementation", "cp", "--abi", tag, "--abi", "abi3",
               "--abi", "none", "--only-binary=:all:"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"lock: pip could not resolve for Python {python}:\n{proc.stderr[-4000:]}")
        installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in installs}


def missing_for_target(resolved: dict[str, dict], requested: list[str], python: str) -> list[str]:
    """Requirements the target Python needs that the resolve (markers of this Python) left out."""
    env = target_environment(python)
    extras_of: dict[str, set[str]] = {}
    wanted: list[Requirement] = [Requirement(r) for r in requested]
    for meta in resolved.values():
        wanted += [Requirement(r) for r in meta.get("requires_dist", [])
                   if "extra ==" not in r.replace("extra==", "extra ==")]
    for req in wanted:
        extras_of.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    for name, meta in resolved.items():  # requirements behind the extras some package asked for
        for extra in extras_of.get(name, ()):
            for r in meta.get("requires_dist", []):
                req = Requirement(r)
                if req.marker is not None and req.marker.evaluate({**env, "extra": extra}):
                    wanted.append(req)
    missing = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name in resolved or name in OURS:
            continue
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            missing.append(f"{req.name}{extras}{req.specifier}")
    return sorted(set(missing))


def torch_requirements() -> list[str]:
    """What the CPU torch wheel on this machine requires (read from its metadata by resolving it
    for this Python): other Pythons resolve these instead of torch, whose PyPI build is CUDA's."""
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    meta = pip_resolve(this, [TORCH])["torch"]
    return [r for r in meta.get("requires_dist", []) if not Requirement(r).name.startswith(NOT_LOCKED_PREFIXES)]


def resolve_closure(python: str, torch_reqs: list[str]) -> dict[str, str]:
    requested = project_requirements() + torch_reqs
    for _ in range(10):
        resolved = pip_resolve(python, requested)
        missing = missing_for_target(resolved, requested, python)
        if not missing:
            return {name: meta["version"] for name, meta in resolved.items()}
        print(f"lock: Python {python} also needs {', '.join(missing)}", flush=True)
        requested += missing
    sys.exit(f"lock: the closure for Python {python} did not settle in 10 rounds")


def write_lock(python: str, versions: dict[str, str]) -> Path:
    lines = [f"{name}=={version}" for name, version in sorted(versions.items())
             if name not in NOT_LOCKED and not name.startswith(NOT_LOCKED_PREFIXES)]
    path = lock_path(python)
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"# Install lock for Python {python}, Linux x86-64: written by scripts/lock.py, read by\n"
        "# scripts/install.sh as pip constraints. Refresh with `make lock` (resolves the newest\n"
        "# releases, then smoke-tests them in a fresh venv); review the diff like code.\n"
        + "\n".join(lines) + "\n")
    return path


def main() -> None:
    torch_reqs = torch_requirements()
    for python in PYTHONS:
        path = write_lock(python, resolve_closure(python, torch_reqs))
        print(f"lock: wrote {path.relative_to(REPO)} ({len(path.read_text().splitlines()) - 3} packages)")


if __name__ == "__main__":
    main()
