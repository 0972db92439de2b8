"""layer_representations against a hand loop over output_hidden_states, both padding sides."""
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from sharelora_kernels.similarity import angular_distance, iter_layer_representations, layer_representations

VOCAB, PAD = 97, 0


def llama():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def bert():
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD)
    return BertModel(cfg)


def samples(n=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=gen)
    lengths[0] = 12  # at least one full row
    return [torch.randint(1, VOCAB, (int(k),), generator=gen) for k in lengths]


def pad(seqs, side):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[r, cols], mask[r, cols] = s, 1
    return ids, mask


def hand_loop(model, seqs, position):
    out = []
    with torch.no_grad():
        for s in seqs:
            hs = model(input_ids=s[None], output_hidden_states=True).hidden_states
            layers = hs[:-1] if position == "input" else hs[1:]
            out.append(torch.stack([h[0, -1] for h in layers]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("make", [llama, bert], ids=["llama", "bert"])
@pytest.mark.parametrize("position", ["input", "output"])
def test_matches_hand_loop_both_padding_sides(make, position):
    model = make().eval()
    seqs = samples()
    expected = hand_loop(model, seqs, position)
    model.train()  # the function must switch to eval (dropout off) and restore the flag
    got = {side: layer_representations(model, *pad(seqs, side), position=position, batch_size=3, progress=False)
           for side in ("left", "right")}
    assert model.training
    L = model.config.num_hidden_layers
    assert got["left"].shape == (L, len(seqs), model.config.hidden_size) and got["left"].dtype == torch.float32
    torch.testing.assert_close(got["right"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["left"], got["right"])


def test_input_and_output_positions_are_shifted():
    model = llama().eval()
    ids, mask = pad(samples(seed=3), "right")
    inp = layer_representations(model, ids, mask, position="input", progress=False)
    out = layer_representations(model, ids, mask, position="output", progress=False)
    torch.testing.assert_close(inp[1:], out[:-1])
    assert not torch.allclose(inp[0], out[0])


def test_no_mask_and_batch_size_do_not_matter():
    model = llama().eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (5, 9), generator=gen)
    a = layer_representations(model, ids, progress=False, batch_size=1)
    b = layer_representations(model, ids, torch.ones_like(ids), progress=False, batch_size=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_streamed_batches_give_the_same_distance():
    """iter_layer_representations yields (L, b, d) batches lazily; angular_distance over the stream
    equals the one-shot result, and the model's training flag is restored when the stream ends."""
    model = llama().train()
    ids, mask = pad(samples(n=9, seed=6), "left")
    stream = iter_layer_representations(model, ids, mask, batch_size=4, progress=False)
    assert model.training  # nothing has run yet
    batches = list(stream)
    assert [tuple(b.shape) for b in batches] == [(3, 4, 32), (3, 4, 32), (3, 1, 32)] and model.training
    one_shot = layer_representations(model, ids, mask, batch_size=4, progress=False)
    torch.testing.assert_close(torch.cat(batches, dim=1), one_shot, rtol=0, atol=0)
    streamed = angular_distance(iter_layer_representations(model, ids, mask, batch_size=4, progress=False))
    torch.testing.assert_close(streamed, angular_distance(one_shot), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="sample 0 has no non-padding token"):  # checked before any forward
        iter_layer_representations(model, ids, torch.zeros_like(mask), progress=False)


def test_a_consumer_that_stops_or_raises_finds_the_training_flags_as_they_were():
    """The flags are restored before each batch is yielded, not when the generator is finalized: an
    unfinished stream, or angular_distance failing on a zero-norm representation (its traceback
    keeping the stream alive), leaves the model in the mode it had, submodules in eval included."""
    model = llama().train()
    model.model.layers[1].eval()
    flags = [m.training for m in model.modules()]
    ids, mask = pad(samples(n=6, seed=3), "right")
    stream = iter_layer_representations(model, ids, mask, batch_size=2, progress=False)
    next(stream)
    assert [m.training for m in model.modules()] == flags
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[:, 0]] = 0  # position input, layer 0: zero norm
    with pytest.raises(ValueError, match="zero norm") as caught:
        angular_distance(iter_layer_representations(model, ids[:, :1], batch_size=2, progress=False))
    assert caught.value.__traceback__ is not None and [m.training for m in model.modules()] == flags


def test_errors():
    model = llama()
    ids, mask = pad(samples(seed=5), "left")
    mask[2] = 0
    with pytest.raises(ValueError, match="sample 2 has no non-padding token"):
        layer_representations(model, ids, mask, progress=False)
    with pytest.raises(ValueError, match="position must be one of"):
        layer_representations(model, ids, position="middle", progress=False)
    with pytest.raises(ValueError, match="attention_mask shape"):
        layer_representations(model, ids, mask[:, 1:], progress=False)
    with pytest.raises(ValueError, match=r"input_ids holds no sample \(shape \(0, 4\)\)"):
        layer_representations(model, ids[:0, :4], progress=False)
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="batch_size must be"):
            iter_layer_representations(model, ids, batch_size=bad)  # before any forward pass


def test_a_model_configured_to_return_tuples_gives_the_same_representations():
    model, seqs = llama(), samples(n=3, seed=4)
    ids, mask = pad(seqs, "right")
    expected = layer_representations(model, ids, mask, progress=False)
    model.config.return_dict = False  # e.g. a config.json with "return_dict": false
    torch.testing.assert_close(layer_representations(model, ids, mask, progress=False), expected, rtol=0, atol=0)
