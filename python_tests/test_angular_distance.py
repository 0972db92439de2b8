"""angular_distance / angular_sums_torch against an independent float64 reference."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharelora_kernels.similarity import RepresentationError, angular_distance
from sharelora_kernels.similarity.distance import angular_sums_torch


def kahan_angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle between the rows of x and y, float64, by 2 atan2(|u - v|, |u + v|) on unit vectors (not the code's formula)."""
    u = x.double() / x.double().norm(dim=-1, keepdim=True)
    v = y.double() / y.double().norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))


def pair_with_angle(theta: float, d: int, gen: torch.Generator) -> torch.Tensor:
    """(2, 1, d) float32: two random-scale vectors at angle ~theta in a random plane."""
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    e1, e2 = q[:, 0], q[:, 1]
    x = e1 * (0.5 + torch.rand((), generator=gen, dtype=torch.float64) * 3)
    y = (math.cos(theta) * e1 + math.sin(theta) * e2) * (0.5 + torch.rand((), generator=gen, dtype=torch.float64) * 3)
    return torch.stack([x, y]).float().unsqueeze(1)


def torch_mean(reps: torch.Tensor) -> torch.Tensor:
    """The torch reference path alone (angular_distance may dispatch to the compiled extension)."""
    return angular_sums_torch(reps) / reps.shape[1]


BACKENDS = pytest.mark.parametrize("distance", [angular_distance, torch_mean], ids=["dispatch", "torch"])


def reference_distance(reps: torch.Tensor) -> torch.Tensor:
    L = reps.shape[0]
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            if i != j:
                out[i, j] = kahan_angle(reps[i], reps[j]).mean() / math.pi
    return out


@BACKENDS
@pytest.mark.parametrize("theta", [1e-4, 3e-4, 1e-3, 1e-2, 0.5, math.pi / 2, 2.0, math.pi - 1e-3, math.pi - 1e-4])
def test_known_angles_float32(theta, distance):
    gen = torch.Generator().manual_seed(int(theta * 1e6) + 1)
    reps = pair_with_angle(theta, 96, gen)
    exact = kahan_angle(reps[0], reps[1])[0]  # angle of the float32-rounded vectors
    assert abs(exact.item() - theta) < 1e-5 * max(theta, 1.0) + 1e-6  # construction sanity
    got = distance(reps)[0, 1] * math.pi
    assert got.dtype == torch.float64
    assert abs(got.item() - exact.item()) <= 1e-3 * exact.item()


@BACKENDS
def test_near_parallel_float32_beats_naive(distance):
    """The naive float32 arccos is far off at 1e-4 rad; the implementation is not."""
    gen = torch.Generator().manual_seed(7)
    reps = pair_with_angle(1e-4, 256, gen)
    exact = kahan_angle(reps[0], reps[1])[0].item()
    x, y = reps[0, 0], reps[1, 0]
    naive = torch.arccos(torch.clamp(x @ y / (x.norm() * y.norm()), -1, 1)).item()
    assert abs(naive - exact) > 1e-3 * exact
    got = distance(reps)[0, 1].item() * math.pi
    assert abs(got - exact) <= 1e-3 * exact


@BACKENDS
def test_exact_orthogonal_and_antiparallel(distance):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, generator=gen)
    a[0], a[1] = 0.0, 0.0
    b = torch.zeros(8)
    b[0], b[1] = 2.5, -1.25  # orthogonal to a, exactly
    reps = torch.stack([a, b, -4.0 * a]).unsqueeze(1)  # layers: a, b, -4a (exact in float32)
    D = distance(reps)
    assert D[0, 1].item() == pytest.approx(0.5, abs=1e-15)
    # c = -1 to within an ulp; arccos near -1 turns an ulp of c into ~1.5e-8 rad, hence the tolerance
    assert D[0, 2].item() == pytest.approx(1.0, abs=1e-8)
    assert D[1, 2].item() == pytest.approx(0.5, abs=1e-15)


@BACKENDS
def test_random_matches_reference_and_properties(distance):
    gen = torch.Generator().manual_seed(11)
    reps = torch.randn(6, 70, 32, generator=gen) + 0.3 * torch.randn(1, 70, 32, generator=gen)  # > 64: two chunks
    D = distance(reps)
    assert D.shape == (6, 6) and D.dtype == torch.float64
    torch.testing.assert_close(D, reference_distance(reps), rtol=1e-10, atol=1e-12)
    assert torch.equal(D, D.T)
    assert torch.equal(D.diagonal(), torch.zeros(6, dtype=torch.float64))
    assert ((D >= 0) & (D <= 1)).all()


def test_bf16_and_layer_dim():
    gen = torch.Generator().manual_seed(12)
    reps = torch.randn(4, 10, 16, generator=gen).bfloat16()
    torch.testing.assert_close(angular_sums_torch(reps), angular_sums_torch(reps.transpose(0, 1), layer_dim=1))
    torch.testing.assert_close(angular_distance(reps), reference_distance(reps.float()), rtol=1e-10, atol=1e-12)


def test_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(13)
    reps = torch.randn(5, 37, 24, generator=gen)
    one = angular_distance(reps)
    streamed = angular_distance(iter(reps.split([10, 1, 20, 6], dim=1)))  # a generator, uneven batches
    torch.testing.assert_close(streamed, one, rtol=1e-13, atol=1e-15)


@BACKENDS
def test_zero_norm_names_sample_and_layer(distance):
    gen = torch.Generator().manual_seed(14)
    reps = torch.randn(4, 9, 8, generator=gen)
    reps[2, 5] = 0.0
    with pytest.raises(ValueError, match=r"sample 5 at layer 2.*zero norm"):
        distance(reps)
    batches = [torch.randn(4, 3, 8, generator=gen), reps[:, 4:]]  # the zero vector is sample 1 of batch 1
    with pytest.raises(ValueError, match=r"sample 1 at layer 2.*batch 1, which starts at sample 3"):
        angular_distance(batches)


@BACKENDS
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_names_sample_and_layer(value, distance):
    gen = torch.Generator().manual_seed(15)
    reps = torch.randn(3, 6, 8, generator=gen)
    reps[1, 4, 3] = value
    with pytest.raises(ValueError, match=r"sample 4 at layer 1 contains NaN or Inf"):
        distance(reps)


@pytest.mark.parametrize("zero, nan, message", [  # zero / nan: (layer, sample) of the bad vector
    ((2, 3), (0, 5), "representation of sample 3 at layer 2 has zero norm (no direction)"),
    ((0, 5), (2, 3), "representation of sample 3 at layer 2 contains NaN or Inf"),
    ((0, 4), (1, 4), "representation of sample 4 at layer 0 has zero norm (no direction)"),
    ((1, 4), (0, 4), "representation of sample 4 at layer 0 contains NaN or Inf"),
    ((3, 2), (0, 66), "representation of sample 2 at layer 3 has zero norm (no direction)"),  # 66: second chunk
])
def test_first_bad_vector_is_named_like_the_extension(zero, nan, message):
    """A zero vector and a NaN: both backends name the first (sample, layer), whatever its kind."""
    from sharelora_kernels import extension

    gen = torch.Generator().manual_seed(19)
    reps = torch.randn(4, 70, 8, generator=gen)
    reps[zero] = 0.0
    reps[nan][1] = float("nan")
    with pytest.raises(RepresentationError) as torch_error:
        angular_sums_torch(reps)
    assert str(torch_error.value) == message
    if not extension.available("cpu"):
        pytest.skip("the compiled CPU kernel is unavailable (the torch path was checked)")
    with pytest.raises(RepresentationError) as extension_error:
        extension.angular_sums(reps)
    assert str(extension_error.value) == message


def hide_extension(monkeypatch):
    """Make ``from sharelora_kernels import extension`` raise ImportError, as without the extension."""
    import sys

    import sharelora_kernels

    monkeypatch.setitem(sys.modules, "sharelora_kernels.extension", None)
    monkeypatch.delattr(sharelora_kernels, "extension", raising=False)


def test_falls_back_without_extension(monkeypatch):
    """No extension module (ImportError) or an unavailable one: the torch path gives the same result."""
    gen = torch.Generator().manual_seed(18)
    reps = torch.randn(5, 12, 16, generator=gen)
    expected = torch_mean(reps)
    hide_extension(monkeypatch)
    torch.testing.assert_close(angular_distance(reps), expected, rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [False, True], ids=["extension-if-built", "no-extension"])
def test_float64_equals_float32_promoted(hidden, monkeypatch):
    """float64 goes to the torch path (the extension takes no float64): same result with or without the extension."""
    gen = torch.Generator().manual_seed(20)
    reps = torch.randn(5, 12, 16, generator=gen)
    expected = reference_distance(reps.double())
    if hidden:
        hide_extension(monkeypatch)
    D = angular_distance(reps.double())
    torch.testing.assert_close(D, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(D, angular_distance(reps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("power", [1000, 530, -565, -1000, -1030])
def test_float64_of_any_magnitude_gives_the_angle(power):
    """float64 vectors (about 1e301, 1e160, 1e-170, 1e-301, 1e-310: subnormal) whose squares overflow or
    underflow are neither NaN nor 'zero norm': each vector is scaled by a power of two first, which
    leaves the angles bit for bit (to subnormal rounding for subnormal entries)."""
    gen = torch.Generator().manual_seed(21)
    reps = torch.randn(4, 6, 8, generator=gen, dtype=torch.float64)
    reps[1, 2] *= 1e-3  # vectors of one sample far apart in magnitude too
    expected = angular_sums_torch(reps)
    scaled = torch.ldexp(reps, torch.tensor(float(power), dtype=torch.float64))
    rtol = 1e-10 if power < -1000 else 0
    torch.testing.assert_close(angular_sums_torch(scaled), expected, rtol=rtol, atol=0)
    torch.testing.assert_close(angular_distance(scaled) * 6, expected, rtol=max(rtol, 1e-15), atol=0)


def test_bad_inputs():
    gen = torch.Generator().manual_seed(16)
    with pytest.raises(ValueError, match="no batch"):
        angular_distance([])
    with pytest.raises(ValueError, match="batch 1 has 3 layers"):
        angular_distance([torch.randn(4, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)])
    with pytest.raises(ValueError, match="3-D"):
        angular_sums_torch(torch.randn(4, 8, generator=gen))
    with pytest.raises(ValueError, match="batch 1 has hidden size d=16, earlier batches have d=8"):
        angular_distance([torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 16, generator=gen)])
    with pytest.raises(ValueError, match="batch 0 has no layers"):
        angular_distance(torch.randn(0, 2, 8, generator=gen))
    with pytest.raises(ValueError, match="batch 0 is on the meta device"):
        angular_distance(torch.empty(4, 2, 8, device="meta"))


# ---------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, shards, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        D = angular_distance(iter(shards[rank]), process_group=dist.group.WORLD)
        torch.save(D, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single(tmp_path):
    gen = torch.Generator().manual_seed(17)
    reps = torch.randn(6, 30, 16, generator=gen)
    shards = [list(reps[:, :11].split(4, dim=1)), list(reps[:, 11:].split(7, dim=1))]
    out = str(tmp_path / "D")
    mp.spawn(_worker, args=(2, _free_port(), shards, out), nprocs=2, join=True)
    single = angular_distance(reps)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), single, rtol=1e-13, atol=1e-15)
