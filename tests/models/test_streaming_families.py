"""BERT, T5, GPT-2 and an extra family (Qwen2) through a real server on loopback: parity with
transformers loading the original source, cache smaller than the model, prefetch on."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from streaming_weights import (
    StreamingBaseModel,
    StreamingBertModel,
    StreamingGPTModel,
    StreamingT5Model,
    cli,
)

from tests.support.streaming import served

# fp32, same transformers code, same weights: results agree to 1e-5 (exact in practice).
ATOL = 1e-5


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_bert_with_padding(tiny_chunks):
    src, chunks = tiny_chunks("bert", layers=4)
    ref = transformers.BertModel.from_pretrained(str(src)).eval()
    ids = torch.tensor([[2, 45, 67, 89, 3], [2, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    tt = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    with served(chunks) as uri, StreamingBertModel("bert", uri, cache_size=1, prefetch_count=1) as m:
        out = m.forward(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    close(out.last_hidden_state, exp.last_hidden_state)
    close(out.pooler_output, exp.pooler_output)


@pytest.mark.parametrize("enc,dec", [(3, 5), (5, 3)])
def test_t5_different_depths_forward_and_generate(tiny_chunks, enc, dec):
    src, chunks = tiny_chunks("t5", enc=enc, dec=dec)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(str(src)).eval()
    base = transformers.T5Model.from_pretrained(str(src)).eval()
    ids = torch.tensor([[5, 9, 23, 44, 1], [7, 8, 1, 0, 0]])
    mask = (ids != 0).long()
    dec_ids = torch.tensor([[0, 12, 13], [0, 5, 6]])
    with served(chunks) as uri, StreamingT5Model("t5", uri, cache_size=2, prefetch_count=1) as m:
        assert len(m.streamed_units) == enc + dec
        out = m.forward(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
        # transformers 5.24 itself cannot generate with T5 when the decoder is deeper than the encoder
        # (its KV cache is sized by num_layers): compare generate where transformers can.
        got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False) if dec <= enc else None
    with torch.no_grad():
        exp = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
        exp_gen = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False) if dec <= enc else None
    close(out.last_hidden_state, exp.last_hidden_state)
    close(out.encoder_last_hidden_state, exp.encoder_last_hidden_state)
    if got is not None:
        assert torch.equal(got, exp_gen)


def test_t5_generate_runs_encoder_once(tiny_chunks):
    _, chunks = tiny_chunks("t5", enc=5, dec=3)
    with StreamingT5Model("t5", str(chunks), cache_size=0, prefetch_count=1) as m:
        calls = []
        orig = m.engine.acquire
        for b in m.engine.bindings:
            b._acquire = lambda name, orig=orig: (calls.append(name), orig(name))[1]
        m.generate(input_ids=torch.tensor([[5, 9, 23, 1]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert sum(c == "encoder.block.0" for c in calls) == 1
    assert sum(c == "decoder.block.0" for c in calls) == 6


def test_gpt2_forward_and_generate(tiny_chunks):
    src, chunks = tiny_chunks("gpt2", layers=5)
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(src)).eval()
    ids = torch.tensor([[10, 20, 30, 40], [0, 0, 50, 60]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding for generation
    with served(chunks) as uri, StreamingGPTModel("gpt2", uri, cache_size=2, prefetch_count=2) as m:
        out = m.forward(input_ids=ids, attention_mask=mask)
        got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        exp = ref.transformer(input_ids=ids, attention_mask=mask)
        exp_gen = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    close(out.last_hidden_state, exp.last_hidden_state)
    assert torch.equal(got, exp_gen)


def test_any_architecture_through_base_class_qwen2(tiny_chunks):
    src, chunks = tiny_chunks("qwen2", layers=4)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with served(chunks) as uri, StreamingBaseModel("qwen2", uri, cache_size=1, prefetch_count=1) as m:
        assert type(m.hf_model).__name__ == "Qwen2ForCausalLM"
        out = m.forward(input_ids=ids)
        got = m.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        exp = ref.model(input_ids=ids)
        exp_gen = ref.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    close(out.last_hidden_state, exp.last_hidden_state)
    assert torch.equal(got, exp_gen)


def test_minilm_real_embeddings_and_embed_cli(minilm_chunks, capsys):
    from tests.support.models import packaged_minilm_dir

    texts = ["Streaming weights layer by layer.", "A cat sat on the mat."]
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    ref = transformers.AutoModel.from_pretrained(str(packaged_minilm_dir())).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        exp = ref(**enc)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    exp_emb = torch.nn.functional.normalize((exp.last_hidden_state * mask).sum(1) / mask.sum(1), dim=1)
    with served(minilm_chunks) as uri:
        with StreamingBertModel("all-MiniLM-L6-v2", uri, cache_size=2) as m:
            out = m.forward(**m.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
        close(out.last_hidden_state, exp.last_hidden_state)
        close(out.pooler_output, exp.pooler_output)
        capsys.readouterr()
        rc = cli.main(["embed", "--server", uri, "--model", "all-MiniLM-L6-v2", "--normalize", "--text", *texts])
        out, err = capsys.readouterr()
    assert rc == 0, err
    got = torch.tensor(json.loads(out)["embeddings"])
    # JSON round-trips float32 through Python floats exactly.
    close(got, exp_emb)


def test_wrong_family_class_rejected(tiny_chunks):
    from streaming_weights.exceptions import UnsupportedArchitectureError

    _, chunks = tiny_chunks("gpt2", layers=5)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        StreamingT5Model("gpt2", str(chunks))
