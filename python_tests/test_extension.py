"""The compiled angular-distance kernels (sharelora_kernels.extension, csrc/) against float64 references.

CPU tests always run (the CPU library is built by `pip install`, or just in time from csrc/); the
same tests run on CUDA when a GPU and the CUDA library are present. The nvcc test compiles every
.cu file for sm_80 and sm_90 and is skipped only where nvcc is absent.
"""
import importlib.util
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from sharelora_kernels import extension
from sharelora_kernels.similarity.distance import angular_sums_torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and extension.available("cuda") else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_sums(reps: torch.Tensor) -> torch.Tensor:
    """The contract's formula on an (L, n, d) tensor, all in float64 (batched Gram)."""
    x = reps.double().transpose(0, 1).cpu()  # (n, L, d)
    gram = x @ x.transpose(1, 2)
    norm = gram.diagonal(dim1=1, dim2=2).sqrt()
    c = (gram / (norm[:, :, None] * norm[:, None, :])).clamp(-1.0, 1.0)
    theta = 2.0 * torch.atan2((1.0 - c).sqrt(), (1.0 + c).sqrt())
    theta.diagonal(dim1=1, dim2=2).zero_()
    return theta.sum(0) / math.pi


def stable_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two vectors, well conditioned near 0 (no cosine): 2 atan2(|u - v|, |u + v|)."""
    u, v = a.double() / a.double().norm(), b.double() / b.double().norm()
    return 2.0 * math.atan2((u - v).norm().item(), (u + v).norm().item())


def test_cpu_library_is_available():
    assert extension.available("cpu")
    assert extension.available(torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_dim", [0, 1])
def test_matches_float64_reference(device, dtype, layer_dim):
    # Odd sizes: L not a multiple of the 4 / 8 row tiles, d not a multiple of any chunk.
    L, n, d = 11, 23, 203
    reps_lnd = torch.randn(L, n, d).to(dtype)
    reps = reps_lnd if layer_dim == 0 else reps_lnd.transpose(0, 1).contiguous()
    got = extension.angular_sums(reps.to(device), layer_dim=layer_dim)
    assert got.dtype == torch.float64 and got.device.type == device and got.shape == (L, L)
    got = got.cpu()
    torch.testing.assert_close(got, reference_sums(reps_lnd), rtol=0, atol=1e-10)
    assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_arbitrary_strides_are_read_in_place(device, dtype):
    L, n, d = 6, 9, 70
    # d-major storage (stride_d = L * n), every other sample, a shifted slice of features.
    storage = torch.randn(d + 3, L, 2 * n).to(dtype).to(device)
    reps = storage.permute(1, 2, 0)[:, ::2, 3:]  # (L, n, d), no element contiguous
    assert reps.shape == (L, n, d) and not reps.is_contiguous()
    expected = reference_sums(reps)
    torch.testing.assert_close(extension.angular_sums(reps).cpu(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(extension.angular_sums(reps.transpose(0, 1), layer_dim=1).cpu(),
                               expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_agrees_with_torch_reference(device):
    reps = torch.randn(9, 40, 128)
    torch.testing.assert_close(extension.angular_sums(reps.to(device)).cpu(),
                               angular_sums_torch(reps), rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angle", [1e-4, 3e-4, 1e-3, 1e-2, 0.5, 3.0])
def test_near_parallel_float32_relative_error(device, angle):
    """theta down to 1e-4 rad within 1e-3 relative error, where a float32 Gram is far off."""
    n, d = 8, 512
    u = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    w = torch.randn(n, d, dtype=torch.float64)
    w = torch.nn.functional.normalize(w - (w * u).sum(1, keepdim=True) * u, dim=1)
    scale = torch.rand(n, 1, dtype=torch.float64) * 10 + 0.1
    a = (scale * u).float()
    b = (math.cos(angle) * u + math.sin(angle) * w).float()
    truth = [stable_angle(a[s], b[s]) for s in range(n)]  # of the float32 vectors themselves
    got = extension.angular_sums(torch.stack([a, b]).to(device))[0, 1].item() * math.pi
    assert abs(got - sum(truth)) <= 1e-3 * sum(truth)
    if angle <= 1e-3:  # the bound is not met by a float32 Gram: the test can tell
        g32 = torch.einsum("nd,nd->n", a, b) / (a.norm(dim=1) * b.norm(dim=1))
        f32 = torch.arccos(g32.clamp(-1, 1)).double().sum().item()
        assert abs(f32 - sum(truth)) > 1e-3 * sum(truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_near_parallel_half_precision(device, dtype):
    """Two half-precision vectors one ulp apart in a few entries: angles ~1e-5..1e-4 rad."""
    d = 256
    a = torch.randn(8, d).to(dtype)
    b = a.clone()
    bits = b.view(torch.int16)
    bits[:, :3] += 1  # next representable magnitude in three entries
    truth = sum(stable_angle(a[s], b[s]) for s in range(8))
    assert 1e-5 * 8 < truth < 1e-3 * 8
    got = extension.angular_sums(torch.stack([a, b]).to(device))[0, 1].item() * math.pi
    assert abs(got - truth) <= 1e-3 * truth


@pytest.mark.parametrize("device", DEVICES)
def test_anti_parallel_and_orthogonal(device):
    n, d = 5, 64
    x = torch.randn(n, d)
    half = torch.cat([torch.randn(n, d // 2), torch.zeros(n, d // 2)], dim=1)
    other = torch.cat([torch.zeros(n, d // 2), torch.randn(n, d // 2)], dim=1)
    reps = torch.stack([x, -2.0 * x, half, other]).to(device)  # (4, n, d), -2 x is exact
    got = extension.angular_sums(reps).cpu() / n  # mean distance
    # Anti-parallel: c = -1 up to an ulp of the normalisation, and pi - theta ~ 2 sqrt(1 + c).
    assert got[0, 1].item() == pytest.approx(1.0, abs=1e-7)
    assert got[2, 3].item() == pytest.approx(0.5, abs=1e-12)  # orthogonal: (pi/2) / pi


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value, problem", [(0.0, "has zero norm"),
                                                (float("nan"), "contains NaN or Inf"),
                                                (float("inf"), "contains NaN or Inf")])
def test_bad_vectors_name_first_sample_and_layer(device, bad_value, problem):
    # Large enough for several CPU threads / GPU blocks; the later offender must not win.
    L, n, d = 8, 600, 256
    reps = torch.randn(L, n, d)
    if bad_value == 0.0:
        reps[3, 5] = 0.0
        reps[1, 400] = 0.0
    else:
        reps[3, 5, 17] = bad_value
        reps[1, 400, 0] = bad_value
    message = f"^representation of sample 5 at layer 3 {problem}"
    with pytest.raises(ValueError, match=message):
        extension.angular_sums(reps.to(device))
    with pytest.raises(ValueError, match=message):
        extension.angular_sums(reps.transpose(0, 1).to(device), layer_dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_no_samples_and_invalid_arguments(device):
    empty = extension.angular_sums(torch.randn(4, 0, 8, device=device))
    assert torch.equal(empty.cpu(), torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        extension.angular_sums(torch.randn(2, 3, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="3-D"):
        extension.angular_sums(torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="layer_dim"):
        extension.angular_sums(torch.randn(2, 3, 4, device=device), layer_dim=2)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in DEVICES,
                    reason="needs a GPU and the CUDA library")
def test_cuda_runs_on_the_current_stream():
    reps = torch.randn(33, 300, 256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = extension.angular_sums(reps)
    torch.testing.assert_close(got.cpu(), reference_sums(reps), rtol=0, atol=1e-9)


@pytest.mark.skipif(extension._CSRC_DIR is None,
                    reason="the package is installed without its csrc/ sources (a wheel, not a checkout)")
def test_jit_build_from_csrc(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARELORA_KERNELS_CACHE", str(tmp_path))
    library = extension._jit_build("cpu")
    assert library.is_file() and tmp_path in library.parents
    extension._load("cpu", library)  # loads and resolves the C entry point


@pytest.mark.skipif(extension._CSRC_DIR is None,
                    reason="the package is installed without its csrc/ sources (a wheel, not a checkout)")
def test_install_time_library_is_used_only_while_it_matches_csrc(tmp_path, monkeypatch):
    """An editable install's library (next to the package) built from older sources gives way to the
    just-in-time build of the csrc/ present; without csrc/ (a wheel) it is used as it is."""
    build = _csrc_build()
    package = tmp_path / "package"
    assert build.build(["cpu"], package) == {"cpu": None}
    prebuilt = package / build.LIBRARIES["cpu"]
    edited = tmp_path / "csrc"
    shutil.copytree(CSRC, edited)
    with open(edited / "angular_distance_cpu.cpp", "a") as source:
        source.write("// edited\n")
    monkeypatch.setattr(extension, "_PACKAGE_DIR", package)
    monkeypatch.setenv("SHARELORA_KERNELS_CACHE", str(tmp_path / "cache"))

    def loaded(csrc: Path) -> Path:
        monkeypatch.setattr(extension, "_CSRC_DIR", csrc)
        extension._library.cache_clear()
        return Path(extension._library("cpu")._name)

    try:
        assert loaded(CSRC) == prebuilt  # built from these sources
        rebuilt = loaded(edited)
        assert rebuilt != prebuilt and tmp_path / "cache" in rebuilt.parents
        assert loaded(None) == prebuilt
    finally:
        extension._library.cache_clear()


def test_a_csrc_folder_beside_an_installed_package_is_not_ours(tmp_path, monkeypatch):
    """Installed in site-packages, the package looked for its sources in site-packages/csrc and ran the
    build.py it found there; only the package's own source tree (its pyproject.toml) counts."""
    site = tmp_path / "site-packages"
    (site / "sharelora_kernels").mkdir(parents=True)
    (site / "csrc").mkdir()
    (site / "csrc" / "build.py").write_text("raise SystemExit('foreign build.py ran')\n")
    monkeypatch.setattr(extension, "_PACKAGE_DIR", site / "sharelora_kernels")
    assert extension._own_csrc() is None
    (site / "pyproject.toml").write_text('[project]\nname = "sharelora_kernels"\n')  # a source checkout
    assert extension._own_csrc() == site / "csrc"


def test_a_gpu_older_than_the_library_is_not_taken(monkeypatch):
    """The CUDA library holds sm_80 / sm_90 code: on an older GPU (a T4, 7.5) its launch would fail
    with a CUDA error; it is unavailable there (one warning) and the torch reference runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    caught = unavailable_twice(extension._builds_for, "cuda:0")
    assert len(caught) == 1 and "built for compute capability 8.0 and later, this GPU is 7.5" in str(caught[0].message)
    assert extension._builds_for((9, 0)) and extension._builds_for((10, 0))


def test_unavailable_library_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "_PACKAGE_DIR", tmp_path)  # no prebuilt library there
    monkeypatch.setenv("SHARELORA_KERNELS_JIT", "0")
    caught = unavailable_twice(extension._library, "cpu")
    assert len(caught) == 1 and "torch reference" in str(caught[0].message)


def unavailable_twice(cached, device: str) -> list:
    """The warnings of two ``available(device)`` calls, both False, ``cached``'s cache cleared around them."""
    cached.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not extension.available(device) and not extension.available(device)
        return caught
    finally:
        cached.cache_clear()


def test_common_header_links_into_one_library_from_two_translation_units(tmp_path):
    """angular_common.h only declares the exported functions: two sources that include it link together."""
    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    sources = []
    for name in ("one", "two"):
        sources.append(tmp_path / f"{name}.cpp")
        sources[-1].write_text(f'#include "angular_common.h"\nint {name}() {{ return SL_FLOAT32; }}\n')
    command = [cxx, "-std=c++17", "-fPIC", "-shared", f"-I{CSRC}", *map(str, sources), "-o", str(tmp_path / "lib.so")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"


def _csrc_build():
    spec = importlib.util.spec_from_file_location("csrc_build", CSRC / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_cu_file_compiles_with_nvcc(arch, tmp_path):
    nvcc = _csrc_build().find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine): cannot compile csrc/*.cu")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources
    for source in sources:
        command = [nvcc, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", str(source),
                   "-o", str(tmp_path / f"{source.stem}.o")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"
