"""`make install` / `make uninstall` into staging roots (DESTDIR): what lands where, that the
installed command and config work, that PREFIX moves everything (the unit's paths too),
that an existing config is never replaced, and that uninstall takes it all back."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from memdefragd.config import load_config

from .conftest import REPO, Installed, make_install

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)$")


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            out[normalize(m[1])] = m[2]
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def files(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Relative path -> path of every file and symlink under root (not directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in skip]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out[os.path.normpath(os.path.join(rel, name))] = Path(dirpath, name)
    return out


def site_packages(tree: Installed) -> Path:
    found = list(tree.path(f"{tree.prefix}/lib/memdefragd/lib").glob("python3.*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def test_install_listing(installed: Installed):
    venv = "usr/local/lib/memdefragd"
    listing = files(installed.root, skip=(f"{venv}/lib", f"{venv}/lib64", f"{venv}/include"))
    assert sorted(listing) == [
        "etc/memdefragd/memdefragd.yaml",
        "usr/local/bin/memdefragd",
        f"{venv}/bin/memdefragd",
        f"{venv}/bin/python",
        f"{venv}/bin/python3",
        f"{venv}/bin/python3.11",
        f"{venv}/pyvenv.cfg",
        "usr/local/lib/systemd/system/memdefragd.service",
        "usr/local/share/doc/memdefragd/README.md",
        "usr/local/share/memdefragd/grafana/memdefragd.json",
        "usr/local/share/memdefragd/grafana/provisioning.yaml",
        "usr/local/share/memdefragd/memdefragd.yaml.example",
        "usr/local/share/memdefragd/prometheus/memdefragd.rules.yml",
    ]
    # The command: a relative link into the virtualenv, whose script runs the venv's
    # python in isolated mode (no PYTHONPATH, no user site, for a root daemon).
    assert os.readlink(listing["usr/local/bin/memdefragd"]) == "../lib/memdefragd/bin/memdefragd"
    script = listing[f"{venv}/bin/memdefragd"]
    assert script.read_text().splitlines()[0] == "#!/usr/local/lib/memdefragd/bin/python3 -I"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert os.readlink(listing[f"{venv}/bin/python3"]) == "/usr/bin/python3"
    for rel in (
        "etc/memdefragd/memdefragd.yaml",
        "usr/local/lib/systemd/system/memdefragd.service",
    ):
        assert stat.S_IMODE(listing[rel].stat().st_mode) == 0o644, rel
    # Shipped files are the repository's.
    for rel, src in {
        "etc/memdefragd/memdefragd.yaml": "etc/memdefragd.yaml",
        "usr/local/share/memdefragd/memdefragd.yaml.example": "etc/memdefragd.yaml",
        "usr/local/share/memdefragd/grafana/memdefragd.json": "etc/grafana/memdefragd.json",
        "usr/local/share/memdefragd/prometheus/memdefragd.rules.yml":
            "etc/prometheus/memdefragd.rules.yml",
        # PREFIX=/usr/local: the unit is installed unchanged
        "usr/local/lib/systemd/system/memdefragd.service": "systemd/memdefragd.service",
    }.items():  # fmt: skip
        assert listing[rel].read_bytes() == (REPO / src).read_bytes(), rel


def test_installed_dependencies_are_the_pins(installed: Installed):
    """The virtualenv holds memdefragd and exactly the pinned versions: no pip, no extras."""
    dists = {}
    for info in site_packages(installed).glob("*.dist-info"):
        meta = (info / "METADATA").read_text()
        name = re.search(r"^Name: (.+)$", meta, re.M)[1].strip()
        dists[normalize(name)] = re.search(r"^Version: (.+)$", meta, re.M)[1].strip()
    assert dists.pop("memdefragd") == "0.1.0"
    expected = pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test_extra = project["optional-dependencies"]["test"]
    for req in map(Requirement, test_extra):  # the dashboard generator's pin: not installed
        expected.pop(normalize(req.name), None)
    if "systemd-python" not in dists:  # the optional extra did not build on this machine
        expected.pop("systemd-python")
        assert "did not install" in installed.log
    assert dists == expected


def test_nothing_refers_to_the_staging_root(installed: Installed):
    needle = str(installed.root).encode()
    offenders = [
        rel for rel, p in files(installed.root).items()
        if not p.is_symlink() and needle in p.read_bytes()
    ]  # fmt: skip
    assert offenders == []


def test_installed_command_checks_the_installed_config(installed: Installed):
    """The installed script, run by the installed interpreter (its shebang names the final
    path, which exists only inside the staging root), on the installed config."""
    script = installed.path("/usr/local/lib/memdefragd/bin/memdefragd")
    conf = installed.path("/etc/memdefragd/memdefragd.yaml")
    r = subprocess.run(
        [str(installed.venv_python), "-I", str(script), "check-config", str(conf)],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    names = [t.name for t in load_config(REPO / "etc/memdefragd.yaml").targets]
    assert names and r.stdout == f"{conf}: OK, {len(names)} target(s): {', '.join(names)}\n"
    # The code it ran is the installed copy, not this checkout.
    r = subprocess.run(
        [str(installed.venv_python), "-I", "-c", "import memdefragd; print(memdefragd.__file__)"],
        capture_output=True, text=True, check=True, cwd="/",
    )  # fmt: skip
    assert r.stdout.startswith(str(site_packages(installed))), r.stdout


def test_prefix_moves_everything_and_keeps_a_changed_config(tmp_path: Path):
    root = tmp_path / "root"
    conf = root / "etc/memdefragd/memdefragd.yaml"
    conf.parent.mkdir(parents=True)
    mine = "# my own\ntargets:\n  - name: mine\n    match: {comm: '^mine$'}\n"
    conf.write_text(mine)
    args = ("PREFIX=/opt/mdd", "UNITDIR=/etc/systemd/system", "INSTALL_EXTRAS=")
    r = make_install(root, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert conf.read_text() == mine, "make install replaced an existing config"
    assert "kept the existing /etc/memdefragd/memdefragd.yaml" in r.stdout
    unit = (root / "etc/systemd/system/memdefragd.service").read_text()
    assert re.findall(r"^Exec\w+=(\S+)", unit, re.M) == [
        "/opt/mdd/bin/memdefragd", "/opt/mdd/bin/memdefragd", "/bin/kill",
    ]  # fmt: skip
    assert "Documentation=file:/opt/mdd/share/doc/memdefragd/README.md" in unit
    assert not [line for line in unit.splitlines() if "/usr/local" in line and line[0] != "#"]
    assert (root / "opt/mdd/share/doc/memdefragd/README.md").is_file()
    entry = root / "opt/mdd/bin/memdefragd"
    assert entry.resolve() == (root / "opt/mdd/lib/memdefragd/bin/memdefragd").resolve()
    assert entry.read_text().startswith("#!/opt/mdd/lib/memdefragd/bin/python3 -I\n")
    assert not list(root.glob("opt/mdd/lib/memdefragd/lib/python3.*/site-packages/systemd"))

    # uninstall: everything goes but the config, which differs from the example
    r = make_install(root, *args, target="uninstall")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept /etc/memdefragd/memdefragd.yaml" in r.stdout
    assert sorted(files(root)) == ["etc/memdefragd/memdefragd.yaml"]


def test_uninstall_removes_an_unchanged_install(installed: Installed, tmp_path: Path):
    root = tmp_path / "copy"
    shutil.copytree(installed.root, root, symlinks=True)
    r = make_install(root, target="uninstall")
    assert r.returncode == 0, r.stdout + r.stderr
    assert files(root) == {}
    assert not (root / "etc/memdefragd").exists()


def test_refuses_a_dangerous_pkglibdir(tmp_path: Path):
    for target in ("install", "uninstall"):
        r = make_install(tmp_path, "PKGLIBDIR=/usr", target=target)
        assert r.returncode != 0 and "PKGLIBDIR must be" in r.stderr, (target, r.stderr)
