"""GGUF export: files read back with gguf.GGUFReader hold exactly the osp model, in llama.cpp's ways."""

import json

import gguf
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from osp.cli.export import main as export_main
from osp.data.tokenizer import train_bpe
from osp.errors import ExportError
from osp.export import export_hf
from osp.export.gguf import GGUFExportError, export_gguf, permute_qk
from tests.support.export import make_tokenizer, tiny_config, trained_like

VOCAB = 320  # > the tokenizer's 302 ids: the tail is written as [PADi] tokens
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 42 times better!",
          "Hello world, hello there; caf\u00e9 na\u00efve \u4f60\u597d \U0001f600"] * 40
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}"
QT = gguf.GGMLQuantizationType
# llama.cpp's tensor names, written out here rather than taken from gguf's own name map.
BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(osp_name: str) -> str:
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if osp_name in top:
        return top[osp_name]
    _, block, rest = osp_name.split(".", 2)
    return f"blk.{block}.{BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


@pytest.fixture(scope="module")
def bpe():
    """osp's own byte-level BPE, plus one non-special and one special added token."""
    tok = train_bpe(CORPUS, vocab_size=300)
    tok.add_tokens(["<note>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


def read_gguf(path):
    """({key: value}, {name: (GGML type, float32 tensor in PyTorch's (out, in) order)})."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        tensors[t.name] = (t.tensor_type, torch.from_numpy(values.copy()))
    return fields, tensors


def unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGML interleaved Q/K rows back to HF halves: per head, rows (2i, 2i+1) -> rows (i, i + d/2)."""
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def undo_permutation(gguf_tensor_name: str, tensor: torch.Tensor, cfg) -> torch.Tensor:
    if gguf_tensor_name.endswith("attn_q.weight"):
        return unpermute(tensor, cfg.n_heads)
    if gguf_tensor_name.endswith("attn_k.weight"):
        return unpermute(tensor, cfg.n_kv_heads)
    return tensor


def rounded(tensor: torch.Tensor, qtype) -> torch.Tensor:
    """What the exact value becomes in a GGUF float type (round to nearest even, like the writer)."""
    dtype = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qtype]
    return tensor.to(dtype).float()


def assert_q8_0_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Q8_0: blocks of 32 along a row, scale d = max|x| / 127 stored as f16, so each value is within
    d/2 plus the scale's rounding (127 * 2^-11 d). Blocks lie within rows, which the Q/K permutation moves
    whole, so the values are also exactly gguf's own round trip of the source."""
    blocks_want, blocks_got = want.reshape(-1, 32), got.reshape(-1, 32)
    step = blocks_want.abs().amax(dim=1, keepdim=True) / 127
    assert ((blocks_got - blocks_want).abs() <= (0.5 + 127 * 2**-11) * step).all()
    round_trip = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), QT.Q8_0), QT.Q8_0)
    assert torch.equal(got, torch.from_numpy(round_trip)) and not torch.equal(got, want)


def test_metadata_and_vocabulary(tmp_path, bpe):
    bpe.chat_template = CHAT_TEMPLATE
    try:
        model = trained_like(tiny_config(vocab_size=VOCAB, rope_theta=5e5, norm_eps=1e-5))
        path = export_gguf(model, tmp_path / "m.gguf", bpe, outtype="f32", name="tiny")
    finally:
        bpe.chat_template = None
    fields, _ = read_gguf(path)
    cfg = model.cfg
    vocab = bpe.get_vocab()
    tokens = [next(t for t, i in vocab.items() if i == n) for n in range(len(vocab))]
    tokens += [f"[PAD{i}]" for i in range(len(vocab), VOCAB)]
    types = [gguf.TokenType.CONTROL if t in ("<|endoftext|>", "<|im_start|>") else
             gguf.TokenType.USER_DEFINED if t == "<note>" else
             gguf.TokenType.UNUSED if t.startswith("[PAD") else gguf.TokenType.NORMAL for t in tokens]
    merges = [" ".join(m) for m in json.loads(bpe.backend_tokenizer.to_str())["model"]["merges"]]
    eos = vocab["<|endoftext|>"]
    assert fields == {
        "general.architecture": "llama", "general.name": "tiny",
        "llama.context_length": cfg.max_seq_len, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": cfg.ffn_hidden, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 5e5, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "llama.vocab_size": VOCAB, "general.file_type": 0, "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eos, "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": eos,  # osp's BPE pads with EOS and has no unk
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert len(merges) > 10 and types.count(gguf.TokenType.UNUSED) == VOCAB - 302


def test_no_chat_template_unless_the_tokenizer_has_one(tmp_path, bpe):
    fields, _ = read_gguf(export_gguf(trained_like(tiny_config(vocab_size=VOCAB)), tmp_path / "m.gguf", bpe))
    assert "tokenizer.chat_template" not in fields and fields["general.file_type"] == 1  # f16 by default


@pytest.mark.parametrize("outtype, file_type, weight_type", [
    ("f32", 0, QT.F32), ("f16", 1, QT.F16), ("bf16", 32, QT.BF16), ("q8_0", 7, QT.Q8_0)])
def test_every_tensor_round_trips(tmp_path, bpe, outtype, file_type, weight_type):
    model = trained_like(tiny_config(vocab_size=VOCAB))
    fields, tensors = read_gguf(export_gguf(model, tmp_path / "m.gguf", bpe, outtype=outtype))
    assert fields["general.file_type"] == file_type
    source = {gguf_name(k): v for k, v in model.state_dict().items()}  # rms, no EmbProj: nothing to fold
    assert set(tensors) == set(source)
    for name, (qtype, tensor) in tensors.items():
        want = source[name].float()
        assert tensor.shape == want.shape, name
        got = undo_permutation(name, tensor, model.cfg)
        if name.endswith("norm.weight"):
            assert qtype == QT.F32 and torch.equal(got, want), name
        elif qtype == QT.Q8_0:
            assert_q8_0_close(got, want)
        else:
            assert qtype == weight_type and torch.equal(got, rounded(want, qtype)), name
    assert {qtype for qtype, _ in tensors.values()} == {QT.F32, weight_type}


def test_q8_0_falls_back_to_f16_where_rows_are_not_blocks_of_32(tmp_path, bpe):
    model = trained_like(tiny_config(vocab_size=VOCAB, ffn_hidden=80))  # down_proj rows of 80
    _, tensors = read_gguf(export_gguf(model, tmp_path / "m.gguf", bpe, outtype="q8_0"))
    assert tensors["blk.0.ffn_up.weight"][0] == QT.Q8_0
    qtype, down = tensors["blk.0.ffn_down.weight"]
    assert qtype == QT.F16 and torch.equal(down, rounded(model.layers[0].mlp.down_proj.weight, QT.F16))


def test_tied_embeddings_write_no_output_tensor(tmp_path, bpe):
    model = trained_like(tiny_config(vocab_size=VOCAB, tie_embeddings=True))
    _, tensors = read_gguf(export_gguf(model, tmp_path / "m.gguf", bpe, outtype="f32"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert torch.equal(tensors["token_embd.weight"][1], model.embed_tokens.weight)


def test_folded_weights_equal_the_hf_export(tmp_path, bpe):
    model = trained_like(tiny_config(vocab_size=VOCAB, norm="ss", emb_proj=True))
    hf_weights = load_file(str(export_hf(model, tmp_path / "hf") / "model.safetensors"))
    _, tensors = read_gguf(export_gguf(model, tmp_path / "m.gguf", bpe, outtype="f32"))
    expected = {gguf_name(k.removeprefix("model.")): v for k, v in hf_weights.items()}
    assert set(tensors) == set(expected)
    for name, (_, tensor) in tensors.items():
        assert torch.equal(undo_permutation(name, tensor, model.cfg), expected[name]), name
    gain = model.layers[1].post_attention_layernorm.weight.item()  # an SSNorm scalar, now a vector
    assert torch.equal(tensors["blk.1.ffn_norm.weight"][1], torch.full((64,), gain))


@pytest.mark.parametrize("overrides, choice", [
    (dict(attn_gate="headwise"), "attn_gate='headwise'"),
    (dict(attn_softmax="clipped", clip_gamma=-0.03), "attn_softmax='clipped'"),
])
def test_models_that_do_not_fold_are_refused(tmp_path, bpe, overrides, choice):
    model = trained_like(tiny_config(vocab_size=VOCAB, **overrides))
    with pytest.raises(GGUFExportError) as info:
        export_gguf(model, tmp_path / "m.gguf", bpe)
    message = str(info.value)
    assert "\n" not in message and "layers.0.self_attn" in message and choice in message
    assert "--format hf" in message and list(tmp_path.iterdir()) == []


def test_tokenizers_llama_cpp_would_not_reproduce_are_refused(tmp_path, bpe):
    model = trained_like(tiny_config(vocab_size=VOCAB))
    with pytest.raises(GGUFExportError, match="model 'WordLevel'"):
        export_gguf(trained_like(tiny_config()), tmp_path / "m.gguf", make_tokenizer())
    backend = Tokenizer.from_str(bpe.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(GGUFExportError, match="pre-tokenizer .*need ByteLevel with the GPT-2 regex"):
        export_gguf(model, tmp_path / "m.gguf", PreTrainedTokenizerFast(tokenizer_object=backend))
    with pytest.raises(ExportError, match="the tokenizer has 302 tokens but the model's vocab_size is 97"):
        export_gguf(trained_like(tiny_config()), tmp_path / "m.gguf", bpe)
    with pytest.raises(GGUFExportError, match="needs the tokenizer"):
        export_gguf(model, tmp_path / "m.gguf", None)
    with pytest.raises(GGUFExportError, match="outtype 'q4_0'"):
        export_gguf(model, tmp_path / "m.gguf", bpe, outtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def ggml_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """GGML's normal-mode RoPE (ggml_rope_f32, mode 0): rotate each adjacent pair (2i, 2i+1) of a head."""
    d = x.shape[-1]
    angles = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angles.cos() - odd * angles.sin()
    out[..., 1::2] = even * angles.sin() + odd * angles.cos()
    return out


def test_qk_permutation_turns_rotate_half_rope_into_ggml_rope():
    """Independent of the export's code: transformers' RoPE on the HF weights equals GGML's RoPE on the
    permuted weights (up to the same row order), so the attention scores llama.cpp computes are HF's."""
    n_heads, n_kv_heads, d, theta = 4, 2, 16, 10000.0
    generator = torch.Generator().manual_seed(3)
    wq = torch.randn(n_heads * d, 64, generator=generator, dtype=torch.float64)
    wk = torch.randn(n_kv_heads * d, 64, generator=generator, dtype=torch.float64)
    x = torch.randn(64, generator=generator, dtype=torch.float64)

    def hf_rope(w, heads, pos):  # (1, heads, 1, d) as transformers' attention uses it
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        emb = torch.cat([pos * inv_freq] * 2)[None, None, :]
        v = (w @ x).reshape(1, heads, 1, d)
        return apply_rotary_pos_emb(v, v, emb.cos(), emb.sin())[0].reshape(heads, d)

    for pos in (0, 1, 7, 31):
        hf_q, hf_k = hf_rope(wq, n_heads, pos), hf_rope(wk, n_kv_heads, pos)
        gg_q = ggml_rope((permute_qk(wq, n_heads) @ x).reshape(n_heads, d), pos, theta)
        gg_k = ggml_rope((permute_qk(wk, n_kv_heads) @ x).reshape(n_kv_heads, d), pos, theta)
        # Same values up to the row order: GGML row 2i + j of a head is HF row j * d/2 + i.
        back_q = unpermute(gg_q.reshape(-1, 1), n_heads).view(n_heads, d)
        back_k = unpermute(gg_k.reshape(-1, 1), n_kv_heads).view(n_kv_heads, d)
        torch.testing.assert_close(back_q, hf_q, rtol=0, atol=1e-12)
        torch.testing.assert_close(back_k, hf_k, rtol=0, atol=1e-12)
        # Scores of query position pos against key position 3 (GQA: head h reads kv head h // 2).
        k3_hf, k3_gg = hf_rope(wk, n_kv_heads, 3), ggml_rope((permute_qk(wk, n_kv_heads) @ x).reshape(
            n_kv_heads, d), 3, theta)
        scores_hf = (hf_q * k3_hf.repeat_interleave(2, 0)).sum(-1)
        scores_gg = (gg_q * k3_gg.repeat_interleave(2, 0)).sum(-1)
        torch.testing.assert_close(scores_gg, scores_hf, rtol=0, atol=1e-10)
        if pos:
            assert not torch.allclose(gg_q, (permute_qk(wq, n_heads) @ x).reshape(n_heads, d))
    # `unpermute`, which the other tests use to compare tensors, is the export permutation's inverse.
    assert torch.equal(unpermute(permute_qk(wq, n_heads), n_heads), wq)
    assert torch.equal(unpermute(permute_qk(wk, n_kv_heads), n_kv_heads), wk)
    assert not torch.equal(permute_qk(wq, n_heads), wq)


@pytest.fixture
def hf_source(tmp_path, bpe):
    """An exported folder with osp's BPE: `osp export` reads it like a run dir."""
    return export_hf(trained_like(tiny_config(vocab_size=VOCAB)), tmp_path / "src", tokenizer=bpe)


def test_cli_writes_gguf_and_refuses_to_overwrite(tmp_path, hf_source, capsys):
    out = tmp_path / "model.gguf"
    export_main([str(hf_source), str(out), "--format", "gguf", "--outtype", "q8_0"])
    assert "llama-completion -m" in capsys.readouterr().out
    assert read_gguf(out)[0]["general.file_type"] == 7
    before = out.read_bytes()
    with pytest.raises(SystemExit) as info:
        export_main([str(hf_source), str(out), "--format", "gguf"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "exists" in err and "--force" in err
    assert out.read_bytes() == before
    export_main([str(hf_source), str(out), "--format", "gguf", "--force"])
    assert read_gguf(out)[0]["general.file_type"] == 1
    folder = tmp_path / "dir"
    folder.mkdir()
    export_main([str(hf_source), str(folder), "--format", "gguf"])
    assert [p.name for p in folder.iterdir()] == ["src.gguf"]  # named after the source


def test_cli_errors_are_one_line(tmp_path, bpe, capsys):
    gated = export_hf(trained_like(tiny_config(vocab_size=VOCAB, attn_gate="headwise")), tmp_path / "gated")
    # The tokenizer from its own folder: AutoTokenizer on a custom-code folder asks about trust_remote_code.
    bpe.save_pretrained(str(tmp_path / "tok"))
    tok = ["--tokenizer", str(tmp_path / "tok")]
    for argv, text in (([str(gated), str(tmp_path / "g.gguf"), "--format", "gguf", *tok], "--format hf"),
                       ([str(gated), str(tmp_path / "g.gguf"), "--format", "gguf", "--dtype", "float16"],
                        "--outtype"),
                       ([str(gated), str(tmp_path / "h"), "--outtype", "f16"], "--format gguf")):
        with pytest.raises(SystemExit) as info:
            export_main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.count("\n") == 1 and text in err and "Traceback" not in err
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "h").exists()


def test_failed_write_leaves_no_partial_file(tmp_path, bpe, monkeypatch):
    model = trained_like(tiny_config(vocab_size=VOCAB))
    target = export_gguf(model, tmp_path / "m.gguf", bpe)
    before = target.read_bytes()
    real = gguf.GGUFWriter.write_tensors_to_file

    def broken(self, *args, **kwargs):  # header and metadata are on disk by now: a real partial file
        real(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, target, bpe, outtype="f32", force=True)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, tmp_path / "new.gguf", bpe)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == before
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="exists; pass force=True"):
        export_gguf(model, target, bpe, outtype="f32")
    assert target.read_bytes() == before


def test_llama_cpp_generates_what_transformers_generates(tmp_path, bpe):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoModelForCausalLM

    model = trained_like(tiny_config(vocab_size=VOCAB))
    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(model, tmp_path / "hf", tokenizer=bpe))).eval()
    llm = llama_cpp.Llama(str(export_gguf(model, tmp_path / "m.gguf", bpe, outtype="f32")), n_ctx=32,
                          verbose=False)
    prompt = bpe.encode("The quick brown fox", add_special_tokens=False)
    assert llm.tokenize(b"The quick brown fox", add_bos=False) == prompt
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    want = want.tolist()
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want
