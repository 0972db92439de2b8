"""Data-parallel training with shared adapters (gloo, 2 CPU processes) equals one process."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sharelora_kernels as sk
from tiny_models import METHOD_CONFIGS, TARGETS, enable_checkpointing, randomize_adapters, tiny_model, token_batch

STEPS, LR = 3, 0.05


def build(name, checkpointing=None):
    model = tiny_model("llama")
    if checkpointing:
        enable_checkpointing(model, checkpointing == "reentrant")
    model = sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model, std=0.1)
    return model.train()


def train(model, batches, wrap=lambda m: m):
    """SGD on (ids,) batches; returns the adapter tensors after training."""
    net = wrap(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for ids in batches:
        opt.zero_grad()
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in sk.model.adapter_tensors(model).items()}


def batches():
    return [token_batch(batch=4, seq=6, seed=40 + s) for s in range(STEPS)]


# (method, wrapper, gradient checkpointing): shared tensors get their summed gradient exactly once.
CASES = [("bishare_slice", "ddp", None), ("similarity", "ddp_static", "reentrant"), ("share_ab", "ddp", "non_reentrant"),
         ("bishare_kron", "fsdp2", None)]


def wrapper(kind):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel
    if kind == "ddp_static":  # reentrant checkpointing re-enters backward once per layer: a static graph
        return lambda model: torch.nn.parallel.DistributedDataParallel(model, static_graph=True)

    def fsdp2(model):  # per decoder layer, then the root: the root's group holds the adapter store
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return fsdp2


def worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, kind, checkpointing in CASES:
        torch.manual_seed(0)
        model = build(name, checkpointing)
        shards = [b[rank * 2:(rank + 1) * 2] for b in batches()]
        trained = train(model, shards, wrapper(kind))
        results[name] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trained.items()}
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_ddp_and_fsdp2_equal_single_process(tmp_path):
    """Each rank trains on half of every batch; gradients are averaged, so parameters match one process
    (without checkpointing), with DDP under both gradient-checkpointing modes and with FSDP2."""
    out = tmp_path / "parallel.pt"
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    parallel = torch.load(out)
    for name, _, _ in CASES:
        torch.manual_seed(0)
        single = train(build(name), batches())
        torch.manual_seed(0)
        start = sk.model.adapter_tensors(build(name))
        assert any(not torch.equal(single[k], start[k]) for k in single)  # training moved the adapters
        for k in single:
            torch.testing.assert_close(parallel[name][k], single[k], rtol=1e-5, atol=1e-6)
