"""The training loop of ``finetune`` and ``compare``: next-token loss on random windows of a token stream,
AdamW on the adapters, a Ctrl-C that never breaks an optimizer step in half, and a held-out loss.
"""
from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import Diverged


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D int64 token tensor, paragraphs joined by a blank line, no special tokens."""
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids = []
    for k, paragraph in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        ids.extend(separator + paragraph if k else paragraph)
    return torch.tensor(ids, dtype=torch.long)


class Windows:
    """Training batches: (batch_size, seq_len) int64 windows of a token stream at random starts (the
    same sequence for the same seed), each starting with the tokenizer's BOS token when it has one,
    like the model's usual inputs."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, bos_id: int | None, seed: int):
        self.bos = torch.tensor([] if bos_id is None else [bos_id], dtype=torch.long)
        self.width = seq_len - len(self.bos)
        if len(tokens) <= self.width:
            raise ValueError(f"the text has {len(tokens)} tokens, too few for windows of {seq_len} tokens")
        self.tokens, self.batch_size = tokens, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.width, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.tokens[s : s + self.width] for s in starts.tolist()])
        return torch.cat([self.bos.expand(self.batch_size, -1), windows], dim=1)


@dataclass
class TrainLog:
    """What a run did: the loss and wall time (ms) of every finished step, and whether Ctrl-C ended it
    before its last step."""

    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    interrupted: bool = False

    def median_step_ms(self) -> float | None:
        return statistics.median(self.step_ms) if self.step_ms else None


def adapter_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (no weight decay) over the model's trainable parameters: the adapters after ``apply``.
    Its multi-tensor (foreach) step on every device: Bi-Share's many small tensors (a gate path has
    six per module) take half the time of the per-tensor loop torch picks on the CPU."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                             foreach=True)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: Callable[[], torch.Tensor], steps: int,
          on_step: Callable[[int, float], None] = lambda step, loss: None,
          interrupts: Interrupts | None = None) -> TrainLog:
    """``steps`` optimizer steps of next-token loss on ``batches()`` (moved to the model's device).

    on_step(step, loss) runs after each finished step (progress bars). Ctrl-C ends the run without
    an exception: during the batch draw, forward or backward at once (the weights are those of the
    last finished step), during the optimizer step right after it. The log says how many steps
    finished. interrupts: the ``Interrupts`` of a caller that saves afterwards (its Ctrl-C's stay
    held until it is done); None: ``train`` holds its own.
    """
    if interrupts is None:
        with Interrupts() as own:
            return train(model, opt, batches, steps, on_step, own)
    device = next(p.device for p in model.parameters())
    log = TrainLog()
    model.train()
    try:
        for step in range(1, steps + 1):
            with interrupts.breakable():
                ids = batches().to(device)
                start = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = loss.item()  # synchronizes a GPU, so the time below is the step's
            if not math.isfinite(value):
                raise Diverged(f"the training loss is {value} at step {step} of {steps}: the run diverged (a lower "
                               "--lr?); its adapters are not written")
            log.step_ms.append((time.perf_counter() - start) * 1e3)
            log.losses.append(value)
            on_step(step, value)
    except KeyboardInterrupt:
        interrupts.requested = True
    log.interrupted = interrupts.requested and len(log.losses) < steps
    opt.zero_grad(set_to_none=True)
    model.eval()
    return log


class Interrupts:
    """Ctrl-C (SIGINT) handling of a training run and the saves after it: a run that saves what it
    finished, whenever the Ctrl-C's come.

    Inside ``with Interrupts() as ctrl_c:`` a Ctrl-C is recorded (``requested``) and raises nothing,
    so no step, save or clean-up is cut in half; inside ``with ctrl_c.breakable():`` (a batch's
    draw, forward and backward) the first Ctrl-C raises KeyboardInterrupt there at once, and a
    block entered after one was requested raises at its start. Later Ctrl-C's are only recorded.
    The previous handler is back when the ``with`` ends. Only the main thread receives signals;
    elsewhere nothing is installed.
    """

    def __init__(self):
        self.requested = False
        self._breakable = False
        self._previous = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        if self._breakable:
            self._breakable = False  # before the raise: a second Ctrl-C arriving now is recorded only
            raise KeyboardInterrupt

    @contextmanager
    def breakable(self):
        """A block the first Ctrl-C stops midway (KeyboardInterrupt); one already requested stops it at its start."""
        self._breakable = True  # before the check: a Ctrl-C in between raises rather than being missed
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self._breakable = False


@torch.no_grad()
def heldout_loss(model: nn.Module, tokens: torch.Tensor, seq_len: int, bos_id: int | None, batch_size: int) -> float:
    """Mean next-token loss (nats per predicted token) over consecutive, non-overlapping windows that
    cover ``tokens`` (1-D int64); each window starts with BOS like the training windows, and predicts
    its tokens after the first (a last window of one token, without BOS, predicts none). Eval mode.
    ValueError if no window predicts a token (under 2 tokens without BOS, none with it)."""
    device = next(p.device for p in model.parameters())
    bos = [] if bos_id is None else [bos_id]
    width = seq_len - len(bos)
    chunks = [torch.tensor(bos + tokens[s : s + width].tolist()) for s in range(0, len(tokens), width)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError(f"{len(tokens)} held-out tokens{'' if bos else ' and no BOS token'}: no token to predict")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(chunks), batch_size):
        group = chunks[k : k + batch_size]
        length = max(len(c) for c in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        labels = torch.full((len(group), length), -100, dtype=torch.long)  # -100: not a target
        for i, c in enumerate(group):
            ids[i, : len(c)], labels[i, : len(c)] = c, c
        loss = model(input_ids=ids.to(device), attention_mask=(labels != -100).to(device), labels=labels.to(device)).loss
        targets = int((labels[:, 1:] != -100).sum())  # the model's loss is the mean over these
        total, count = total + loss.item() * targets, count + targets
    model.train(was_training)
    return total / count
