"""The VM harness's pure parts, on the host: package names, the initramfs archive, the
junit results. (Booting a guest is `make vm-test`, README "Kernels".)"""

from __future__ import annotations

from pathlib import Path

from tests.vm.harness import SERIES, Cpio, Package, _deb_path, parse_junit


def test_series_match_the_amd64_flavour_only():
    assert SERIES["5.10"].pattern.match("linux-image-5.10.0-46-amd64-unsigned")
    assert SERIES["5.10"].suite == "bullseye"
    assert SERIES["6.1"].pattern.match("linux-image-6.1.0-57-amd64-unsigned")
    assert not SERIES["6.1"].pattern.match("linux-image-6.1.0-57-cloud-amd64-unsigned")  # no 9p
    assert SERIES["6.12"].pattern.match("linux-image-6.12.118+deb12-amd64-unsigned")
    assert not SERIES["6.12"].pattern.match("linux-image-6.12.118+deb12-rt-amd64-unsigned")


def test_deb_path_is_where_apt_get_download_puts_it():
    p = Package(
        "busybox-static",
        "1:1.35.0-4",
        "0" * 64,
        "pool/main/b/busybox/busybox-static_1.35.0-4_amd64.deb",
    )
    assert _deb_path(Path("/c"), p) == Path("/c/busybox-static_1%3a1.35.0-4_amd64.deb")


def test_cpio_newc_entries_are_aligned_and_terminated():
    c = Cpio()
    c.dir("bin")
    c.file("init", b"#!/bin/sh\n", 0o755)
    c.chardev("dev/console", 5, 1)
    data = c.bytes()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    offset, names = 0, []
    while True:
        hdr = data[offset : offset + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[offset + 110 : offset + 110 + namesize - 1].decode()
        names.append(name)
        offset += (110 + namesize + 3) // 4 * 4
        if name == "init":
            assert data[offset : offset + size] == b"#!/bin/sh\n"
            assert fields[1] == 0o100755
        if name == "dev/console":
            assert (fields[1] & 0o170000, fields[9], fields[10]) == (0o020000, 5, 1)
        offset += (size + 3) // 4 * 4
        if name == "TRAILER!!!":
            break
    assert names == ["bin", "init", "dev/console", "TRAILER!!!"] and offset == len(data)


def test_junit_outcomes(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernel.test_a" name="test_ok"><properties>'
        '<property name="order" value="hot, cold"/></properties></testcase>'
        '<testcase classname="tests.kernel.test_a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.kernel.test_a" name="test_skip"><skipped type="pytest.skip" message="no"/></testcase>'
        '<testcase classname="tests.kernel.test_a" name="test_x"><skipped type="pytest.xfail" message="known"/></testcase>'
        "</testsuite></testsuites>"
    )
    results = parse_junit(tmp_path / "j.xml")
    assert results[0].properties == {"order": "hot, cold"}
    got = [(r.nodeid, r.outcome) for r in results]
    assert got == [
        ("tests/kernel/test_a.py::test_ok", "passed"),
        ("tests/kernel/test_a.py::test_bad", "failed"),
        ("tests/kernel/test_a.py::test_skip", "skipped"),
        ("tests/kernel/test_a.py::test_x", "xfailed"),
    ]
