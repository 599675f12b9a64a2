"""NoisyEmbedding as a drop-in nn.Embedding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neft_kernels import NoisyEmbedding, noisy_embedding

from support.asserts import assert_bits_equal
from support.devices import DEVICE

BACKEND = "triton" if DEVICE == "cuda" else "torch"


def _module(**kw):
    torch.manual_seed(0)
    kw.setdefault("backend", BACKEND)
    return NoisyEmbedding(50, 12, device=DEVICE, **kw)


def _ids():
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_eval_mode_and_zero_alpha_are_exactly_f_embedding():
    emb = _module(padding_idx=0)
    ids = _ids()
    emb.eval()
    assert_bits_equal(emb(ids), F.embedding(ids, emb.weight, padding_idx=0))
    emb.train()
    emb.noise_alpha = 0.0
    assert_bits_equal(emb(ids), F.embedding(ids, emb.weight, padding_idx=0))


def test_train_mode_is_the_functional_op_with_a_seed_from_torch_generator():
    emb = _module(noise_alpha=7.0)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.manual_seed(1234)
    out = emb(ids, attention_mask=mask)
    torch.manual_seed(1234)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    assert_bits_equal(out, noisy_embedding(ids, emb.weight, 7.0, seed=seed, attention_mask=mask,
                                           backend=BACKEND))
    assert (out[1, 6:] == emb.weight[ids[1, 6:]]).all()  # masked tokens get no noise
    torch.manual_seed(1234)
    assert_bits_equal(emb(input_ids=ids, attention_mask=mask), out)  # the documented keyword
    assert not torch.equal(out[0], emb.weight[ids[0]])


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_train_mode_passes_every_option_to_the_op(distribution):
    """distribution, length_mode, padding_idx and scale_grad_by_freq reach the op: the output is the
    functional op's with the same options and the seed the module drew, the gradient F.embedding's."""
    emb = _module(noise_alpha=5.0, padding_idx=2, scale_grad_by_freq=True, distribution=distribution,
                  length_mode="padded")
    ids = _ids()
    ids[0, :3] = 2  # the padding row, repeated
    ids[1, 1:5] = ids[1, 0]  # a repeated id: scale_grad_by_freq divides its gradient by 5
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # "padded": L is the row width and every token is noised all the same
    torch.manual_seed(42)
    out = emb(ids, attention_mask=mask)
    torch.manual_seed(42)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    assert_bits_equal(out, noisy_embedding(ids, emb.weight, 5.0, seed=seed, attention_mask=mask, length_mode="padded",
                                           distribution=distribution, backend=BACKEND))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (grad,) = torch.autograd.grad(out, emb.weight, grad_out)
    weight = emb.weight.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(F.embedding(ids, weight, padding_idx=2, scale_grad_by_freq=True), weight, grad_out)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6)
    assert (grad[2] == 0).all()


def test_reproducible_under_manual_seed_and_fresh_noise_each_call():
    emb = _module()
    ids = _ids()
    torch.manual_seed(5)
    a, b = emb(ids), emb(ids)
    torch.manual_seed(5)
    assert_bits_equal(emb(ids), a)
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(9)
    emb.configure_noise(generator=gen)
    c = emb(ids)
    gen.manual_seed(9)
    assert_bits_equal(emb(ids), c)


def test_noise_alpha_can_change_between_steps():
    emb = _module(noise_alpha=1.0)
    ids = _ids()
    torch.manual_seed(3)
    small = emb(ids) - emb.weight[ids]
    emb.noise_alpha = 10.0
    torch.manual_seed(3)
    large = emb(ids) - emb.weight[ids]
    torch.testing.assert_close(large, small * 10, rtol=1e-4, atol=1e-6)


def test_state_dict_matches_nn_embedding():
    emb = _module(padding_idx=3)
    plain = nn.Embedding(50, 12, padding_idx=3, device=DEVICE)
    assert emb.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(emb.state_dict())
    assert torch.equal(plain.weight, emb.weight)
    emb2 = _module()
    emb2.load_state_dict(plain.state_dict())
    assert torch.equal(emb2.weight, plain.weight)


def test_from_embedding_shares_the_weight_and_keeps_a_tied_head_tied():
    torch.manual_seed(0)
    base = nn.Embedding(50, 12, padding_idx=1, device=DEVICE)
    head = nn.Linear(12, 50, bias=False, device=DEVICE)
    head.weight = base.weight
    emb = NoisyEmbedding.from_embedding(base, noise_alpha=5.0, backend=BACKEND)
    assert emb.weight is base.weight is head.weight
    assert emb.padding_idx == 1 and emb.noise_alpha == 5.0
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    ids = _ids()
    loss = head(emb(ids)).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert emb.weight is head.weight
    assert emb.weight.grad is not None and (emb.weight.grad[1] != 0).any()  # head's grad reaches row 1


def test_padding_row_gets_no_gradient_from_the_lookup():
    emb = _module(padding_idx=0)
    ids = _ids()
    ids[:, :3] = 0
    emb(ids).sum().backward()
    assert (emb.weight.grad[0] == 0).all()
    assert (emb.weight.grad[ids[ids != 0]] != 0).all()


def test_max_norm_renormalizes_like_nn_embedding():
    emb = _module(max_norm=1.0)
    plain = nn.Embedding(50, 12, max_norm=1.0, device=DEVICE)
    plain.load_state_dict(emb.state_dict())
    ids = _ids()
    emb(ids)
    plain(ids)
    torch.testing.assert_close(emb.weight, plain.weight)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sparse"):
        NoisyEmbedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="length_mode"):
        NoisyEmbedding(10, 4, length_mode="packed")
    with pytest.raises(ValueError, match="noise_alpha"):
        NoisyEmbedding(10, 4, noise_alpha=-1.0)
    with pytest.raises(ValueError, match="backend"):
        NoisyEmbedding(10, 4, backend="cuda-graphs")


def test_repr_names_the_noise():
    assert "noise_alpha=5.0" in repr(NoisyEmbedding(10, 4))


def test_forwards_autograd_does_not_record_get_no_noise_unless_asked():
    """no_grad / inference_mode passes (reference log-probs, train-mode generation) are clean by default."""
    from neft_kernels import noise_without_grad

    emb = NoisyEmbedding(50, 12, noise_alpha=5.0).train()
    ids = torch.randint(0, 50, (2, 7))
    plain = F.embedding(ids, emb.weight).detach()
    with torch.no_grad():
        assert torch.equal(emb(ids), plain)
        with noise_without_grad():
            assert not torch.equal(emb(ids), plain)
    with torch.inference_mode():
        assert torch.equal(emb(ids), plain)
    assert not torch.equal(emb(ids).detach(), plain)  # with grad recorded: noise, frozen weight or not
    emb.weight.requires_grad_(False)
    assert not torch.equal(emb(ids), plain)


def test_from_pretrained_takes_the_noise_options():
    weight = torch.randn(50, 12)
    emb = NoisyEmbedding.from_pretrained(weight, padding_idx=0, noise_alpha=3.0, length_mode="padded")
    plain = nn.Embedding.from_pretrained(weight, padding_idx=0)
    assert emb.weight.data_ptr() == weight.data_ptr() and not emb.weight.requires_grad and emb.padding_idx == 0
    assert (emb.noise_alpha, emb.noise_options.length_mode) == (3.0, "padded") and emb.training
    assert_bits_equal(emb.eval()(_ids().cpu()), plain(_ids().cpu()))
    assert NoisyEmbedding.from_pretrained(weight, freeze=False).weight.requires_grad
    with pytest.raises(ValueError, match="noise_alpha"):
        NoisyEmbedding.from_pretrained(weight, noise_alpha=-1.0)
    with pytest.raises(ValueError, match="2-dimensional"):
        NoisyEmbedding.from_pretrained(torch.randn(3))
