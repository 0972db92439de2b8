"""Layer representations: the last non-padding token's hidden state at every layer (the README's "The methods")."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import check_int

POSITIONS = ("input", "output")


def layer_representations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position: str = "input",
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Hidden state of each sample's last non-padding token at every layer.

    model: a Transformers model (decoder such as LLaMA / Mistral / Qwen2, or encoder such as BERT)
        whose forward accepts ``output_hidden_states=True`` and returns L + 1 hidden states
        (embeddings, then each layer's output). Its backbone (``model.base_model``) is called, so
        no LM head logits are computed. It runs in eval mode under ``torch.no_grad()``; the
        training flag of each of its modules is restored after each forward pass.
    input_ids: (n, T) integer token ids; attention_mask: (n, T), 1 = token, 0 = padding
        (None: no padding). At least one row; every row needs at least one token.
    position: "input" takes ``hidden_states[l]`` (the residual stream entering layer l),
        "output" takes ``hidden_states[l + 1]`` (leaving it; for the last layer this is whatever
        the model reports, e.g. after the final norm in LLaMA).
    batch_size: samples per forward pass; progress: show a tqdm bar when there is more than one batch.

    Padding: each batch is rewritten to right padding (the tokens of a row moved, in order, to its
    start) before the forward pass, so left and right padding give the same inputs, the same
    positions (absolute position embeddings such as BERT's included) and the same result; the last
    non-padding token is then at index ``mask.sum() - 1``.

    Returns (L, n, d) float32 on the CPU. For a calibration set too large to hold, stream instead:
    ``angular_distance(iter_layer_representations(...))`` keeps one batch at a time.
    """
    batches = iter_layer_representations(model, input_ids, attention_mask, position, batch_size, progress)
    return torch.cat([b.cpu() for b in batches], dim=1)


def iter_layer_representations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position: str = "input",
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """``layer_representations`` one batch at a time: yields (L, b, d) float32 on the model's device.

    Same arguments and checks (all made before the first forward pass). Feed it to
    ``angular_distance``, which accumulates a running sum, so no (L, n, d) tensor is ever built and
    a GPU model's batches go to the CUDA kernel without a copy to the host.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {list(POSITIONS)}, got {position!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (n, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError(f"input_ids holds no sample (shape {tuple(input_ids.shape)}): nothing to represent")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lengths = (attention_mask != 0).sum(dim=1)
    empty = torch.nonzero(lengths == 0).flatten()
    if len(empty):
        raise ValueError(f"sample {empty[0].item()} has no non-padding token")
    return _batches(model, input_ids, attention_mask, position, batch_size, progress)


def _batches(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position: str,
             batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """The batches, each from a forward pass in eval mode; every module's training flag is restored
    before the batch is yielded, so a consumer that stops early or raises finds the model as it was."""
    backbone = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    starts = range(0, input_ids.shape[0], batch_size)
    for s in tqdm(starts, desc="layer representations", disable=not progress or len(starts) < 2, leave=False):
        ids, mask = _right_pad(input_ids[s : s + batch_size], attention_mask[s : s + batch_size])
        flags = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  output_hidden_states=True, return_dict=True).hidden_states
        finally:
            for m, training in flags.items():
                m.training = training
        layers = hidden[:-1] if position == "input" else hidden[1:]
        last = (mask.sum(dim=1) - 1).to(device)
        rows = torch.arange(ids.shape[0], device=device)
        yield torch.stack([h[rows, last].float() for h in layers])


def _right_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's tokens (mask != 0), in order, to the row's start; (b, T') with T' the longest row."""
    keep = mask != 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # tokens first, in order
    width = int(keep.sum(dim=1).max())
    ids = torch.gather(ids, 1, order)[:, :width]
    new_mask = torch.gather(keep, 1, order)[:, :width].long()
    return ids, new_mask
