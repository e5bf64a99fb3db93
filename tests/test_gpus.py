"""GPU profiles, --gpu parsing and NVML auto-detection (no GPU needed: NVML is faked)."""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from qplan.errors import DeviceError, QplanError, UsageError
from qplan.loaders import gpus
from qplan.loaders.gpus import (
    find_profile,
    load_profiles,
    normalize,
    parse_size,
    resolve_gpu,
)
from qplan.planner.gpu import GIB, MIB, GpuProfile, GpuTarget
from qplan.profiles import data_dir

PROFILES = load_profiles()
BY_KEY = {p.key: p for p in PROFILES}
ARCH_BY_CC = {
    "7.0": "volta",
    "7.5": "turing",
    "8.0": "ampere",
    "8.6": "ampere",
    "8.9": "ada",
    "9.0": "hopper",
    "10.0": "blackwell",
    "12.0": "blackwell",
}


def _cc(p: GpuProfile) -> tuple[int, int]:
    major, minor = p.compute_capability.split(".")
    return int(major), int(minor)


# --------------------------------------------------------------------------- profiles


def test_enough_profiles_in_every_segment() -> None:
    assert len(PROFILES) >= 30
    assert {p.segment for p in PROFILES} == {"consumer", "workstation", "datacenter"}


def test_shipped_json_files_carry_the_schema_and_match_the_loader() -> None:
    files = sorted(e for e in data_dir("gpus").iterdir() if e.name.endswith(".json"))
    assert len(files) == len(PROFILES)
    for entry in files:
        raw = json.loads(entry.read_text(encoding="utf-8"))
        assert raw["schema"] == "qplan.gpu/v1", entry.name
        assert raw["key"] == entry.name.removesuffix(".json")
        assert set(raw) - {"schema"} == {f.name for f in fields(GpuProfile)}, entry.name


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.key)
def test_every_profile_is_well_formed(profile: GpuProfile) -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", profile.key)
    assert isinstance(profile.memory_bytes, int)
    assert 4 * GIB <= profile.memory_bytes <= 256 * GIB
    assert profile.memory_bytes % MIB == 0  # NVML totals and spec sizes are whole MiB
    assert re.fullmatch(r"[0-9]+\.[0-9]", profile.compute_capability)
    assert profile.architecture == ARCH_BY_CC[profile.compute_capability]
    assert profile.bf16 is (_cc(profile) >= (8, 0))
    assert profile.fp8 is (profile.architecture in {"ada", "hopper", "blackwell"})
    assert 100 <= profile.bandwidth_gb_s <= 10_000
    assert profile.segment in {"consumer", "workstation", "datacenter"}
    assert profile.nvml_names and all(isinstance(n, str) and n for n in profile.nvml_names)
    assert all(isinstance(a, str) and a for a in profile.aliases)
    assert profile.sources and all(isinstance(s, str) and s for s in profile.sources)
    assert "NVML" in profile.memory_source or "spec sheet" in profile.memory_source
    if not profile.memory_source.startswith("NVML"):
        assert "no NVML reading" in profile.memory_source


def test_keys_unique_and_no_name_claimed_by_two_profiles() -> None:
    assert len({p.key for p in PROFILES}) == len(PROFILES)
    owner: dict[str, str] = {}
    for p in PROFILES:
        for label in {normalize(n) for n in (p.key, p.name, *p.aliases)}:
            assert owner.setdefault(label, p.key) == p.key, (label, p.key, owner[label])
    # An NVML name may be shared (3080 10/12 GB) but never shadow another profile's claim.
    for p in PROFILES:
        for name in p.nvml_names:
            assert owner.get(normalize(name), p.key) == p.key, name


def test_most_memory_totals_are_real_nvml_readings() -> None:
    readings = [p for p in PROFILES if p.memory_source.startswith("NVML")]
    assert len(readings) >= 30


# (key, GiB, GB/s, compute capability); tolerance 2 % on memory, 1 % on bandwidth,
# in the style of llm-analysis' gpu_configs.
PUBLISHED = [
    ("rtx-4090", 24, 1008, "8.9"),
    ("rtx-3090", 24, 936, "8.6"),
    ("rtx-5090", 32, 1792, "12.0"),
    ("rtx-a6000", 48, 768, "8.6"),
    ("l40s", 45, 864, "8.9"),
    ("l4", 22.5, 300, "8.9"),
    ("t4", 15, 320, "7.5"),
    ("v100-16gb", 15.8, 900, "7.0"),
    ("v100-32gb", 31.7, 900, "7.0"),
    ("a10g", 22.5, 600, "8.6"),
    ("a100-40gb-sxm", 40, 1555, "8.0"),
    ("a100-80gb-sxm", 80, 2039, "8.0"),
    ("a100-80gb-pcie", 80, 1935, "8.0"),
    ("h100-sxm", 79.6, 3350, "9.0"),
    ("h100-nvl", 93.6, 3900, "9.0"),
    ("h200", 140.4, 4800, "9.0"),
    ("b200", 179, 8000, "10.0"),
]


@pytest.mark.parametrize(("key", "gib", "bw", "cc"), PUBLISHED)
def test_published_figures(key: str, gib: float, bw: float, cc: str) -> None:
    p = BY_KEY[key]
    assert p.memory_bytes / GIB == pytest.approx(gib, rel=0.02)
    assert p.bandwidth_gb_s == pytest.approx(bw, rel=0.01)
    assert p.compute_capability == cc


def test_pinned_nvml_totals() -> None:
    assert BY_KEY["h100-sxm"].memory_bytes == 81_559 * MIB
    assert BY_KEY["rtx-4090"].memory_bytes == 24_564 * MIB
    assert BY_KEY["a100-80gb-sxm"].memory_bytes == 81_920 * MIB
    assert BY_KEY["t4"].memory_bytes == 15_360 * MIB
    assert BY_KEY["a10g"].memory_bytes == 23_028 * MIB
    assert BY_KEY["l4"].memory_bytes == 23_034 * MIB


def test_old_gpus_have_no_bf16() -> None:
    assert BY_KEY["t4"].bf16 is False and BY_KEY["t4"].compute_capability == "7.5"
    assert BY_KEY["v100-32gb"].bf16 is False and BY_KEY["v100-32gb"].compute_capability == "7.0"
    assert BY_KEY["a100-40gb-pcie"].bf16 is True and BY_KEY["a100-40gb-pcie"].fp8 is False
    assert BY_KEY["rtx-4090"].fp8 is True


# --------------------------------------------------------------------------- loader errors


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the loader at a temporary folder holding one copy of the 4090 profile."""
    good = json.loads((Path(str(data_dir("gpus"))) / "rtx-4090.json").read_text())
    monkeypatch.setattr(gpus, "data_dir", lambda name: tmp_path)
    gpus.load_profiles.cache_clear()

    def write(data: dict, name: str = "rtx-4090.json") -> None:
        (tmp_path / name).write_text(json.dumps(data))

    write(good)
    yield write, good
    gpus.load_profiles.cache_clear()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compute_capability": "8,9"}, "compute_capability"),
        ({"bf16": False}, "contradicts compute capability"),
        ({"memory_bytes": "24GiB"}, "memory_bytes must be an integer"),
        ({"memory_bytes": 0}, "memory_bytes must be positive"),
        ({"key": "rtx-4091"}, "does not match the file name"),
        ({"segment": "gaming"}, "segment"),
        ({"schema": "qplan.gpu/v0"}, "schema"),
        ({"surprise": 1}, "unknown field"),
        ({"sources": []}, "sources"),
    ],
)
def test_bad_profile_names_the_file(profile_dir, change: dict, message: str) -> None:
    write, good = profile_dir
    write({**good, **change})
    with pytest.raises(gpus.ProfileError, match=message) as info:
        gpus.load_profiles()
    assert "rtx-4090.json" in str(info.value)
    assert isinstance(info.value, QplanError)


def test_missing_field_and_bad_json_are_reported(profile_dir) -> None:
    write, good = profile_dir
    write({k: v for k, v in good.items() if k != "bandwidth_gb_s"})
    with pytest.raises(gpus.ProfileError, match=r"rtx-4090\.json: missing field.*bandwidth"):
        gpus.load_profiles()
    gpus.load_profiles.cache_clear()
    write(good)
    (Path(str(gpus.data_dir("gpus"))) / "broken.json").write_text("{not json")
    with pytest.raises(gpus.ProfileError, match=r"broken\.json"):
        gpus.load_profiles()


def test_alias_claimed_twice_is_refused(profile_dir) -> None:
    write, good = profile_dir
    write(
        {**good, "key": "rtx-4090-copy", "name": "Copy", "aliases": ["4090"]}, "rtx-4090-copy.json"
    )
    with pytest.raises(gpus.ProfileError, match="also claimed"):
        gpus.load_profiles()


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "text",
    ["4090", "rtx-4090", "RTX 4090", "rtx4090", "NVIDIA GeForce RTX 4090", " Rtx_4090 "],
)
def test_4090_spellings(text: str) -> None:
    assert find_profile(text).key == "rtx-4090"


def test_normalize_ignores_case_punctuation_and_vendor_words() -> None:
    assert normalize("RTX-4090") == normalize("rtx 4090") == normalize("4090") == "4090"
    assert normalize("Tesla T4") == normalize("t4")
    assert normalize("A100-80GB") == normalize("a100 80 GiB")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("h100", "h100-sxm"),  # documented default: what clouds mean by "H100"
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("h100 pcie", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("a100-80gb", "a100-80gb-sxm"),
        ("A100 80", "a100-80gb-sxm"),  # same memory, form factor unknown -> SXM
        ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
        ("A100-SXM4-40GB", "a100-40gb-sxm"),
        ("tesla t4", "t4"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("a10", "a10"),
        ("A10G", "a10g"),
        ("l4", "l4"),
        ("l40", "l40"),
        ("L40S", "l40s"),
        ("3060 ti", "rtx-3060-ti"),
        ("4060 Ti 16GB", "rtx-4060-ti-16gb"),
        ("rtx 3080 12gb", "rtx-3080-12gb"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
        ("a6000", "rtx-a6000"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("5090", "rtx-5090"),
    ],
)
def test_names(text: str, key: str) -> None:
    assert find_profile(text).key == key


@pytest.mark.parametrize(
    ("text", "choices"),
    [
        ("a100", ["a100-40gb-pcie", "a100-40gb-sxm", "a100-80gb-pcie", "a100-80gb-sxm"]),
        ("v100", ["v100-16gb", "v100-32gb"]),
        ("3080", ["rtx-3080-10gb", "rtx-3080-12gb"]),
        ("NVIDIA GeForce RTX 4060 Ti", ["rtx-4060-ti-8gb", "rtx-4060-ti-16gb"]),
    ],
)
def test_ambiguous_memory_lists_the_choices(text: str, choices: list[str]) -> None:
    with pytest.raises(UsageError, match="ambiguous") as info:
        find_profile(text)
    message = str(info.value)
    assert "\n" not in message
    for key in choices:
        assert key in message


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UsageError) as info:
        find_profile("rtx 4099")
    message = str(info.value)
    assert "\n" not in message
    assert "rtx-4090" in message
    assert "qplan gpus" in message


def test_bare_number_that_is_no_gpu_hints_at_a_size() -> None:
    with pytest.raises(UsageError, match=r"--gpu 24GiB"):
        resolve_gpu("24")


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("24 GiB", 24 * 2**30),
        ("24gib", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("80 gb", 80 * 10**9),
        ("24g", 24 * 2**30),
        ("24Gi", 24 * 2**30),
        ("81559MiB", 81_559 * 2**20),
        ("12000MB", 12_000 * 10**6),
        ("1.5TiB", 3 * 2**39),
        ("0.5GiB", 2**29),
        ("2TB", 2 * 10**12),
    ],
)
def test_sizes_are_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-24GiB", "negative"),
        ("0GiB", "more than zero"),
        ("0.0GB", "more than zero"),
        ("24", "needs a unit"),
        ("24 parsecs", "unknown size unit"),
        ("24KB", "unknown size unit"),
        ("101TiB", "more than 100 TiB"),
        ("garbage", "not a size"),
        ("", "not a size"),
        ("1e3GB", "not a size"),
    ],
)
def test_bad_sizes(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem) as info:
        parse_size(text)
    assert "--gpu" in str(info.value)  # the fix is named


def test_size_target_assumes_a_modern_gpu() -> None:
    t = resolve_gpu("24GiB")
    assert t == GpuTarget(
        name="24 GiB GPU",
        count=1,
        memory_bytes=24 * GIB,
        source="size",
        compute_capability=None,
        bf16=True,
        architecture=None,
    )
    assert resolve_gpu("80GB").name == "80 GB GPU"


def test_resolve_reports_bad_sizes_not_unknown_gpus() -> None:
    with pytest.raises(UsageError, match="negative"):
        resolve_gpu("-24GiB")
    with pytest.raises(UsageError, match="unknown size unit"):
        resolve_gpu("24KB")
    with pytest.raises(UsageError, match="100 TiB"):
        resolve_gpu("200TiB")


# --------------------------------------------------------------------------- targets & counts


def test_profile_target() -> None:
    t = resolve_gpu("rtx-4090")
    assert t.source == "profile" and t.profile_key == "rtx-4090" and t.count == 1
    assert t.memory_bytes == 24_564 * MIB and t.compute_capability == "8.9"
    assert t.architecture == "ada" and t.bf16 is True and t.free_bytes is None
    assert resolve_gpu("t4").bf16 is False


@pytest.mark.parametrize(
    ("spec", "count", "key"),
    [
        ("2x A100-80GB", 2, "a100-80gb-sxm"),
        ("4x4090", 4, "rtx-4090"),
        ("8 x h100", 8, "h100-sxm"),
        ("2×L40S", 2, "l40s"),
        ("1x t4", 1, "t4"),
    ],
)
def test_count_prefix(spec: str, count: int, key: str) -> None:
    t = resolve_gpu(spec)
    assert (t.count, t.profile_key) == (count, key)


def test_count_prefix_on_a_size() -> None:
    t = resolve_gpu("2x24GiB")
    assert (t.count, t.memory_bytes, t.source) == (2, 24 * GIB, "size")


def test_num_gpus_overrides_and_must_agree() -> None:
    assert resolve_gpu("4090", num_gpus=3).count == 3
    assert resolve_gpu("2x4090", num_gpus=2).count == 2
    with pytest.raises(UsageError, match="give the count once"):
        resolve_gpu("2x4090", num_gpus=4)


@pytest.mark.parametrize("bad", [0, -1, 1025])
def test_bad_counts(bad: int) -> None:
    with pytest.raises(UsageError):
        resolve_gpu("4090", num_gpus=bad)
    if bad >= 0:
        with pytest.raises(UsageError):
            resolve_gpu(f"{bad}x4090")


def test_empty_spec() -> None:
    with pytest.raises(UsageError, match="empty"):
        resolve_gpu("  ")


# --------------------------------------------------------------------------- NVML


class FakeNvml(types.ModuleType):
    """Just enough of pynvml for query_devices; handles are the NVML indices."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict], *, init_error: Exception | None = None) -> None:
        super().__init__("pynvml")
        self.devices = devices
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.devices[h]["name"]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        d = self.devices[h]
        return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.devices[h]["cc"]

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"  # old bindings return bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:08d}-aaaa"


def H100(free_gib: float = 80) -> dict:
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "total": 81_559 * MIB,
        "free": int(free_gib * GIB),
        "cc": (9, 0),
    }


def RTX4090(free_gib: float = 23) -> dict:
    return {
        "name": "NVIDIA GeForce RTX 4090",
        "total": 24_564 * MIB,
        "free": int(free_gib * GIB),
        "cc": (8, 9),
    }


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(devices: list[dict], **kw) -> FakeNvml:
        fake = FakeNvml(devices, **kw)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def test_auto_one_device(fake_nvml) -> None:
    fake = fake_nvml([RTX4090(free_gib=20)])
    t = resolve_gpu("auto")
    assert t.source == "nvml" and t.count == 1
    assert t.name == "NVIDIA GeForce RTX 4090" and t.profile_key == "rtx-4090"
    assert t.memory_bytes == 24_564 * MIB and t.free_bytes == 20 * GIB
    assert (t.compute_capability, t.architecture, t.bf16) == ("8.9", "ada", True)
    assert fake.shutdowns == 1


def test_auto_two_identical_devices(fake_nvml) -> None:
    fake_nvml([H100(free_gib=79), H100(free_gib=60)])
    t = resolve_gpu("auto")
    assert (t.count, t.profile_key, t.memory_bytes) == (2, "h100-sxm", 81_559 * MIB)
    assert t.free_bytes == 60 * GIB  # the tightest device decides
    assert resolve_gpu("auto", num_gpus=1).free_bytes == 79 * GIB
    with pytest.raises(UsageError, match="found 2"):
        resolve_gpu("auto", num_gpus=4)


def test_auto_mixed_devices(fake_nvml) -> None:
    fake_nvml([RTX4090(), H100()])
    t = resolve_gpu("auto")
    assert (t.count, t.profile_key) == (1, "rtx-4090")
    devices = gpus.auto_devices()
    assert [d.profile_key for d in devices] == ["rtx-4090", "h100-sxm"]
    assert all(d.count == 1 and d.source == "nvml" for d in devices)


def test_cuda_visible_devices_indices(fake_nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml([RTX4090(), H100(), H100()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.index for d in gpus.nvml.query_devices()] == [1]
    assert resolve_gpu("auto").profile_key == "h100-sxm"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [d.index for d in gpus.nvml.query_devices()] == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,0")  # CUDA stops at an invalid index
    assert [d.index for d in gpus.nvml.query_devices()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000002")
    assert [d.index for d in gpus.nvml.query_devices()] == [2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match="hides all 3"):
        resolve_gpu("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(DeviceError):
        resolve_gpu("auto")


def test_device_fields(fake_nvml) -> None:
    fake_nvml([RTX4090(free_gib=10)])
    (dev,) = gpus.nvml.query_devices()
    assert dev == gpus.nvml.NvmlDevice(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        total_bytes=24_564 * MIB,
        free_bytes=10 * GIB,
        used_bytes=24_564 * MIB - 10 * GIB,
        compute_capability="8.9",
        driver_version="550.54.15",
    )


def test_unmatched_device_derives_from_compute_capability(fake_nvml) -> None:
    fake_nvml([{"name": "Quadro RTX 8000", "total": 48 * GIB, "free": 40 * GIB, "cc": (7, 5)}])
    t = resolve_gpu("auto")
    assert t.profile_key is None and t.bf16 is False and t.architecture == "turing"
    assert t.memory_bytes == 48 * GIB and t.name == "Quadro RTX 8000"


def test_shared_nvml_name_picks_closest_memory(fake_nvml) -> None:
    dev = {"name": "NVIDIA GeForce RTX 3080", "total": 12_288 * MIB, "free": GIB, "cc": (8, 6)}
    fake_nvml([dev])
    assert resolve_gpu("auto").profile_key == "rtx-3080-12gb"


def test_old_driver_names_without_vendor_prefix_match(fake_nvml) -> None:
    fake_nvml([{"name": "A100-SXM-80GB", "total": 81_252 * MIB, "free": GIB, "cc": (8, 0)}])
    assert resolve_gpu("auto").profile_key == "a100-80gb-sxm"


def test_no_driver_errors_are_one_line(fake_nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_nvml([], init_error=FakeNvml.NVMLError("Driver Not Loaded"))
    with pytest.raises(DeviceError) as info:
        resolve_gpu("auto")
    message = str(info.value)
    assert "\n" not in message
    assert "no NVIDIA driver found for --gpu auto (Driver Not Loaded)" in message
    assert "--gpu 4090" in message and "--gpu 24GiB" in message
    assert fake.shutdowns == 0  # nothing to shut down when init failed

    fake_nvml([])
    with pytest.raises(DeviceError, match="reports no GPUs"):
        resolve_gpu("auto")

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(DeviceError, match="nvidia-ml-py"):
        resolve_gpu("auto")


def test_real_pynvml_without_a_driver_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmocked: on a machine without the NVIDIA driver NVML's library is not found."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        reason = str(exc)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceError) as info:
        resolve_gpu("auto")
    assert reason in str(info.value)
    assert str(info.value).startswith("no NVIDIA driver found for --gpu auto")
