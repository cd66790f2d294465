"""What a resume compares: the run record's config differences."""

from __future__ import annotations

from osp.training.run_record import differences


def test_resume_ignores_the_bpe_size_only_for_a_pretrained_tokenizer():
    stored = {"data.tokenizer": "HuggingFaceTB/SmolLM-135M", "data.vocab_size": 32768, "optim.lr": 1e-3}
    current = {**stored, "data.vocab_size": 49152}
    assert differences(stored, current) == []
    bpe = {"data.tokenizer": "bpe", "data.vocab_size": 4096}
    assert differences(bpe, {**bpe, "data.vocab_size": 8192}) == [("data.vocab_size", 4096, 8192)]
