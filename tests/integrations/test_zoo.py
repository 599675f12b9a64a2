"""The model zoo: every architecture in transformers' auto mappings for causal LM, masked LM, seq2seq
and sequence classification that builds from a tiny config offline, patched and checked bit for bit.

For each: eval logits unchanged by the patch; in train mode the first input-embedding call equals
spec v1 with the per-sequence ``L`` of the model's ``attention_mask`` (right- and left-padded
rows; no mask for models whose ``forward`` takes none), and, for causal LMs that take
``position_ids``, per packed sub-sequence (and from flash-attention's ``cu_seq_lens_q`` where the
model passes ``**kwargs`` down); noise after the module's own ``forward`` for scaled embeddings;
``unpatch_model`` restores the classes. A family that cannot work (a quantised table, no token
table) must refuse at ``patch_model`` with a clear error and leave the model untouched. Architectures
that cannot be built tiny (composite configs, defaults too large, configs our generic sizes do not
fit) are skipped with the reason.
``NEFT_ZOO=all`` (the default) runs every one; ``NEFT_ZOO=llama,bert`` only those model types.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # every architecture transformers has: about 20 s on 2 cores
from transformers import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from neft_kernels import NoisyEmbedding, noisy_embedding, patch_model, unpatch_model  # noqa: E402
from neft_kernels.integrations.hf import is_patched  # noqa: E402

from support.asserts import assert_bits_equal  # noqa: E402

ALPHA = 5.0
VOCAB = 96
MAX_PARAMS = 3_000_000
# Size fields under every name the configs use; a config takes those it has.
TINY = dict(hidden_size=32, n_embd=32, d_model=32, embed_dim=32, dim=32, n_embed=32, d_embed=32, emb_dim=32,
            intermediate_size=64, ffn_dim=64, d_ff=64, n_inner=64, encoder_ffn_dim=64, decoder_ffn_dim=64,
            hidden_dim=64, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, encoder_layers=1,
            decoder_layers=1, num_decoder_layers=1, num_attention_heads=4, n_head=4, num_heads=4, n_heads=4,
            encoder_attention_heads=4, decoder_attention_heads=4, num_key_value_heads=2, head_dim=8, d_kv=8,
            vocab_size=VOCAB, max_position_embeddings=128, n_positions=128, attention_dropout=0.0,
            hidden_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout_rate=0.0, pad_token_id=0, bos_token_id=1,
            eos_token_id=1, decoder_start_token_id=1)
MAPPINGS = {"causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            "masked_lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            "classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
_ONLY = os.environ.get("NEFT_ZOO", "all")
CASES = [(kind, model_type, cls) for kind, mapping in MAPPINGS.items() for model_type, cls in mapping.items()
         if isinstance(cls, str) and (_ONLY == "all" or model_type in _ONLY.split(","))]


def _tiny(model_type: str, class_name: str) -> nn.Module:
    """The architecture built from its default config shrunk by TINY, or a skip saying why not."""
    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(f"{class_name} is not exported by this transformers")
    try:
        config = CONFIG_MAPPING[model_type]()
        if getattr(config, "text_config", None) is not None or getattr(config, "vision_config", None) is not None:
            pytest.skip("composite (multimodal) config: not built from a tiny config generically")
        for name, value in TINY.items():
            try:
                if hasattr(config, name):
                    setattr(config, name, value)
            except Exception:  # noqa: BLE001 - a derived or per-layer field: leave it
                pass
        with torch.device("meta"):
            params = sum(p.numel() for p in cls(config).parameters())
        if params > MAX_PARAMS:
            pytest.skip(f"{params} parameters with the generic tiny sizes")
        torch.manual_seed(0)
        return cls(config).eval()
    except Exception as err:  # noqa: BLE001 - any failure of the config itself
        pytest.skip(f"cannot be built from a tiny config: {type(err).__name__}: {str(err)[:120]}")


def _batch(kind: str, left: bool):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([[12], [7], [3]])
    ids = torch.randint(2, VOCAB, (3, 12), generator=g)
    cols = torch.arange(12)[None]
    mask = (cols >= 12 - lengths) if left else (cols < lengths)
    kwargs = dict(input_ids=ids * mask, attention_mask=mask.long())
    if kind == "seq2seq":
        kwargs["decoder_input_ids"] = torch.randint(2, VOCAB, (3, 5), generator=g)
    return kwargs


def _first_embedding_call(model: nn.Module, kwargs: dict):
    """(module, ids, output) of the first noisy-embedding call in a train-mode forward (seed 0)."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, a, out: calls.append((mod, a[0], out.detach().clone())))
             for m in model.modules() if isinstance(m, NoisyEmbedding)]
    torch.manual_seed(0)
    try:
        model.train()(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert calls, "no noisy embedding was called"
    return calls[0]


def _expected(module: nn.Module, ids: torch.Tensor, **side) -> torch.Tensor:
    torch.manual_seed(0)
    seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
    original = vars(module)["_neft_original_class"]
    if original.forward is nn.Embedding.forward:
        return noisy_embedding(ids, module.weight, ALPHA, seed=seed, backend="torch", **side)
    plain = original.forward(module, ids).detach()  # a scaled embedding: noise after its own forward
    rows = plain.reshape(-1, plain.shape[-1])
    positions = torch.arange(rows.shape[0]).view(ids.shape)
    return noisy_embedding(positions, rows, ALPHA, seed=seed, backend="torch", **side).view(plain.shape)


@pytest.mark.parametrize("kind,model_type,class_name", CASES, ids=[f"{k}-{t}" for k, t, _ in CASES])
def test_patched_architecture_gives_spec_noise_per_sequence(kind, model_type, class_name):
    warnings.simplefilter("ignore")
    model = _tiny(model_type, class_name)
    right = _batch(kind, left=False)
    try:
        with torch.no_grad():
            eval_logits = model(**right).logits
    except Exception as err:  # noqa: BLE001 - the unpatched tiny model itself does not run
        pytest.skip(f"the tiny model does not run unpatched: {type(err).__name__}: {str(err)[:120]}")
    classes = {id(m): type(m) for m in model.modules()}

    try:
        patch_model(model, ALPHA)
    except TypeError as err:  # a family that cannot work says so at patch time (a quantised table, no table)
        assert "input embeddings" in str(err) or "get_input_embeddings" in str(err), err
        assert {id(m): type(m) for m in model.modules()} == classes and not is_patched(model)
        return
    with torch.no_grad():
        assert torch.equal(model.eval()(**right).logits, eval_logits)  # eval: exactly as before
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    for left in (False, True):
        batch = _batch(kind, left)
        module, ids, out = _first_embedding_call(model, batch)
        side = dict(attention_mask=batch["attention_mask"]) if takes_mask and ids.shape == batch["input_ids"].shape \
            else {}
        assert_bits_equal(out, _expected(module, ids, **side))
    if "position_ids" in inspect.signature(model.forward).parameters and kind == "causal_lm":
        lengths = [5, 9, 4]
        ids = torch.randint(2, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        module, seen_ids, out = _first_embedding_call(model, dict(input_ids=ids, position_ids=pos))
        assert_bits_equal(out, _expected(module, seen_ids, position_ids=pos))
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()):
            # flash-attention's kwargs, as the collator passes them
            cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
            module, seen_ids, out = _first_embedding_call(model, dict(
                input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9))
            assert_bits_equal(out, _expected(module, seen_ids, cu_seqlens=cu))

    unpatch_model(model)
    assert {id(m): type(m) for m in model.modules()} == classes
