"""RAPL CPU package energy on a fake powercap tree: wrap-around, sub-zones, absence reasons."""
from __future__ import annotations

import pytest

from llem_server.energy import EnergyMeter
from llem_server.energy import rapl as rapl_mod
from llem_server.energy.rapl import RaplReader, RaplUnavailable

MAX = 1_000_000  # uJ


def zone(root, name, label, energy, max_uj=MAX):
    d = root / name
    d.mkdir()
    (d / "name").write_text(label + "\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    return d


def test_packages_summed_subzones_ignored_and_wrap_undone(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 10_000)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 5)
    psys = zone(tmp_path, "intel-rapl:2", "psys", 7)  # the platform: the packages are inside it
    r = RaplReader(str(tmp_path))
    assert r.domains == ["package-0", "package-1"]
    assert r.read().value == 0.0
    (p0 / "energy_uj").write_text("100000\n")  # wrapped: 900 000 -> MAX -> 100 000
    (p1 / "energy_uj").write_text("60000\n")
    (core / "energy_uj").write_text("999999\n")
    (psys / "energy_uj").write_text("999999\n")
    assert r.read().value == pytest.approx((200_000 + 50_000) / 1000)  # mJ


def test_meter_cpu_energy_over_a_window(tmp_path):
    big = 20_000_000  # uJ range; 50 W adds 5 000 000 uJ per 0.1 s, so it wraps every 0.4 s
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", big - 10_000, max_uj=big)
    t = [100.0]
    m = EnergyMeter.unavailable("no NVIDIA GPU: test", rapl_root=str(tmp_path), clock=lambda: t[0])
    assert m.cpu_sensor().available and m.cpu_sensor().method == "rapl_package_energy"
    uj = big - 10_000
    for k in range(21):  # 2 s, sampled every 0.1 s
        t[0] = 100.0 + k * 0.1
        (p0 / "energy_uj").write_text(f"{uj % big}\n")
        m.sample_once()
        uj += 5_000_000
    w = m.open_window([], 100.55, "r")
    m.close_window(w, 101.55, 1)
    r = m.report(w, 0.01)
    assert not r.available and r.reason == "no NVIDIA GPU: test"  # GPU energy absent...
    assert r.cpu.available and r.cpu.domains == ["package-0"]  # ...CPU energy reported apart
    assert r.cpu.energy_j == pytest.approx(50.0, rel=1e-6)


def test_absent_with_reasons(tmp_path, monkeypatch):
    with pytest.raises(RaplUnavailable, match="does not exist"):
        RaplReader(str(tmp_path / "nope"))
    with pytest.raises(RaplUnavailable, match="no intel-rapl:N package zones"):
        RaplReader(str(tmp_path))
    zone(tmp_path, "intel-rapl:0", "package-0", 1)

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(rapl_mod, "_read_int", denied)
    with pytest.raises(RaplUnavailable, match="permission denied.*CVE-2020-8694"):
        RaplReader(str(tmp_path))
    s = EnergyMeter([], rapl_root=str(tmp_path)).cpu_sensor()
    assert not s.available and "permission denied" in s.reason


def test_a_platform_zone_alone_is_no_package_energy(tmp_path):
    zone(tmp_path, "intel-rapl:0", "psys", 1)
    with pytest.raises(RaplUnavailable, match="no package zone.*only psys"):
        RaplReader(str(tmp_path))


def test_cpu_energy_of_a_window_longer_than_the_sample_buffer(tmp_path):
    """Open windows pin the RAPL samples too (up to 8 x the buffer)."""
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj=10**12)
    t = [100.0]
    m = EnergyMeter.unavailable("no NVIDIA GPU: test", rapl_root=str(tmp_path), clock=lambda: t[0], capacity=20)
    uj = 0
    w = None
    for k in range(130):  # 13 s at 0.1 s: six times the buffer
        t[0] = 100.0 + k * 0.1
        (p0 / "energy_uj").write_text(f"{uj}\n")
        m.sample_once()
        if k == 5:
            w = m.open_window([], 100.55, "long")
        uj += 2_000_000  # 20 W
    m.close_window(w, 112.55, 1)
    r = m.report(w, 0.01)
    assert r.cpu.available, r.cpu.reason
    assert r.cpu.energy_j == pytest.approx(20.0 * 12.0, rel=1e-6)
