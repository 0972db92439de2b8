"""Options several commands share, and their checks. Nothing here imports torch, so ``--help`` and a
bad option answer at once; ``set_threads`` imports it when the command runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import require_between, require_positive


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the training loop (``finetune`` and ``compare``); ``check_training_arguments`` checks them."""
    p.add_argument("--batch-size", metavar="N", type=int, default=4, help="windows per step (default: 4)")
    p.add_argument("--seq-len", metavar="N", type=int, default=128,
                   help="tokens per window, BOS included (default: 128)")
    p.add_argument("--lr", metavar="LR", type=float, default=3e-3,
                   help="AdamW learning rate, no weight decay (default: 3e-3)")
    p.add_argument("--seed", metavar="N", type=int, default=0,
                   help="seed of the adapter init and of the window order, in [0, 2**32 - 1] (default: 0)")


FLOAT32_MAX = 3.4028234663852886e38


def check_training_arguments(args: argparse.Namespace) -> None:
    """CommandError naming the first bad value among ``add_training_arguments``' options (--seed: a
    32-bit seed, what torch's CPU generator keeps: seeds 2**32 apart would give one run; --lr: at most
    float32's largest value, which the optimizer's arithmetic takes)."""
    require_positive(args, "batch_size", "lr")
    require_between(args, "lr", 0, FLOAT32_MAX)
    require_between(args, "seq_len", 2)
    require_between(args, "seed", 0, 2**32 - 1)


def check_training_fits(args: argparse.Namespace, model_config, model_dir, device: str) -> None:
    """CommandError naming the option if the training windows do not fit the model or the device:
    --seq-len longer than the model's maximum positions, or a batch whose logits alone (--batch-size
    x --seq-len tokens x the vocabulary, float32) exceed the memory of ``device`` (cpu or cuda)."""
    import os

    import torch

    from . import CommandError
    from .loading import max_positions

    limit = max_positions(model_config)
    if limit is not None and args.seq_len > limit:
        raise CommandError(f"--seq-len {args.seq_len} is longer than the model of {model_dir} takes: at most "
                           f"{limit} tokens (its maximum positions, config.json)")
    kind = torch.device(device).type
    if kind == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    elif kind == "cuda":
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        return
    vocab = getattr(model_config.get_text_config(), "vocab_size", None) or 1
    logits = args.batch_size * args.seq_len * vocab * 4
    if logits > memory:
        raise CommandError(f"--batch-size {args.batch_size} with --seq-len {args.seq_len}: the logits of one batch "
                           f"alone take {logits / 2**30:,.1f} GiB ({vocab:,} per token, float32), more than the "
                           f"{memory / 2**30:,.1f} GiB of memory of {device}: lower --batch-size")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command (``set_threads`` applies it)."""
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="torch CPU threads (default: torch's, which is OMP_NUM_THREADS when set, else one per "
                        "core); 1 is fastest on a machine other work keeps busy")


def check_threads_argument(args: argparse.Namespace) -> None:
    """CommandError naming ``--threads`` unless it is absent or at least 1."""
    if args.threads is not None:
        require_between(args, "threads", 1)


def set_threads(args: argparse.Namespace) -> int:
    """Apply ``--threads`` (when given) to torch; returns the thread count torch now uses."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def positive_int(text: str) -> int:
    """argparse type of an int >= 1 (the standalone bench scripts' --repeats, --tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def out_file(text: str) -> Path:
    """argparse type of the JSON file a standalone bench script writes (temporary file and rename):
    its folder must exist and it must not be a folder itself, checked before anything is timed."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give the JSON file to write")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.absolute().parent} does not exist")
    return path
