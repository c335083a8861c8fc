"""fastnlp attention as a transformers attention implementation: small randomly
initialised models (nothing is downloaded) give the eager implementation's
results under padding masks."""

import inspect

import pytest
import torch

from markers import import_transformers_bridge

fastnlp_transformers = import_transformers_bridge()
import transformers  # noqa: E402

VOCAB = 97


def _bert(attn_implementation: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, max_position_embeddings=64, attn_implementation=attn_implementation)
    settings.update(config)
    return transformers.BertModel(transformers.BertConfig(**settings))


def _llama(attn_implementation: str) -> torch.nn.Module:
    """A decoder with grouped-query attention: 4 query heads over 2 kv-heads."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation=attn_implementation)
    return transformers.LlamaForCausalLM(config)


def _batch(lengths, total: int):
    """Token ids and a right-padded attention mask (1 = real token)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=generator)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def test_registered_under_its_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "fastnlp" in AttentionInterface._global_mapping
    assert "fastnlp" in AttentionMaskInterface._global_mapping
    assert _bert("fastnlp").config._attn_implementation == "fastnlp"


def test_bert_matches_eager_under_padding_outputs_weights_and_gradients():
    ids, mask = _batch([17, 9, 3], total=17)
    eager, ours = _bert("eager").train(False), _bert("fastnlp").train(False)
    ours.load_state_dict(eager.state_dict())
    expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    got = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    for ours_weights, eager_weights in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours_weights, eager_weights, atol=1e-6, rtol=1e-5)

    # Gradients through the real tokens' states reach every parameter alike.
    # (Not a sum of squares: that of a LayerNorm output is nearly constant.)
    probe = torch.randn(expected.last_hidden_state[real].shape, generator=torch.Generator().manual_seed(2))
    (expected.last_hidden_state[real] * probe).sum().backward()
    (got.last_hidden_state[real] * probe).sum().backward()
    eager_params = dict(eager.named_parameters())
    for name, param in ours.named_parameters():
        if eager_params[name].grad is None:
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad, eager_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_reaches_the_kernel_as_a_broadcast_mask(monkeypatch):
    """The model's padding mask arrives at fastnlp.ops.attention as a view of
    (batch, key_len), not a materialised (query_len, key_len) mask."""
    seen = []
    real_attention = fastnlp_transformers.attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real_attention(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fastnlp_transformers, "attention", spy)
    ids, mask = _batch([12, 5], total=12)
    _bert("fastnlp").eval()(input_ids=ids, attention_mask=mask)
    assert len(seen) == 2  # one call per layer
    for attn_mask in seen:
        assert attn_mask.dtype == torch.bool and attn_mask.shape == (2, 1, 12, 12)
        assert attn_mask.stride(2) == 0
        torch.testing.assert_close(attn_mask[:, 0, 0, :], mask.bool())

    seen.clear()
    _bert("fastnlp").eval()(input_ids=ids)  # no padding: no mask at all
    assert seen == [None, None]


def test_fully_padded_row_is_finite():
    ids, mask = _batch([6, 0], total=6)
    out = _bert("fastnlp").eval()(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all()


def test_decoder_with_gqa_matches_eager_under_padding_and_with_a_cache():
    ids, mask = _batch([11, 6], total=11)
    eager, ours = _llama("eager").eval(), _llama("fastnlp").eval()
    ours.load_state_dict(eager.state_dict())
    real = mask.bool()
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
        # No padding: the causal flag instead of a mask.
        torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        # Decoding from a cache: one query over all cached keys.
        prompt, full = ids[:1, :8], ids[:1, :9]
        # transformers renamed past_key_values to cache (argument and output) in 5.x.
        name = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"
        cache = getattr(ours(input_ids=prompt, use_cache=True), name)
        step = ours(input_ids=full[:, 8:], **{name: cache}).logits[:, -1]
        torch.testing.assert_close(step, eager(input_ids=full).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_attention_dropout_is_repeatable_for_a_seed():
    ids, mask = _batch([10, 7], total=10)
    model = _bert("fastnlp", attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0).train()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    model.eval()
    assert not torch.equal(runs[0], model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_attention_dropout_applies_with_output_attentions_too():
    # output_attentions takes another kernel (attention_with_weights): the
    # returned weights are the dropped ones, which the output is made from.
    query, key, value = (torch.randn(2, 2, 64, 8) for _ in range(3))
    torch.manual_seed(3)
    out, weights = fastnlp_transformers.fastnlp_attention_forward(
        torch.nn.Module(), query, key, value, None, dropout=0.3, is_causal=False, output_attentions=True)
    assert abs((weights == 0).float().mean().item() - 0.3) < 0.05
    torch.testing.assert_close(out, (weights @ value).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    plain, _ = fastnlp_transformers.fastnlp_attention_forward(torch.nn.Module(), query, key, value, None,
                                                              dropout=0.3, is_causal=False)
    torch.testing.assert_close(plain, out, atol=1e-5, rtol=1e-5)  # the same draw on the kernel without weights


def test_paged_cache_is_refused_with_a_clear_error():
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="paged caches"):
        fastnlp_transformers.fastnlp_attention_forward(torch.nn.Module(), query, query, query, None,
                                                       cache=object())


def test_softcap_is_refused_with_a_clear_error():
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="softcap"):
        fastnlp_transformers.fastnlp_attention_forward(torch.nn.Module(), query, query, query, None, softcap=30.0)


def test_attention_sinks_are_refused_with_a_clear_error():
    # GPT-OSS passes its sinks as s_aux; ignoring them would give wrong outputs.
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention sinks"):
        fastnlp_transformers.fastnlp_attention_forward(torch.nn.Module(), query, query, query, None,
                                                       s_aux=torch.zeros(2))


def test_t5_trains_like_eager_with_its_learned_position_bias():
    # T5's relative position bias is a parameter added to the scores: the
    # kernel's additive mask, with a gradient.
    def t5(attn_implementation):
        torch.manual_seed(0)
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_decoder_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                                       pad_token_id=0, attn_implementation=attn_implementation)
        return transformers.T5ForConditionalGeneration(config)

    ids, mask = _batch([9, 5], total=9)
    labels = ids[:, :6].clone()
    eager, ours = t5("eager"), t5("fastnlp")
    ours.load_state_dict(eager.state_dict())
    results = []
    for model in (eager, ours):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    names = [name for name, _ in ours.named_parameters()]
    assert any("relative_attention_bias" in name for name in names)
    for name, got, want in zip(names, results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
