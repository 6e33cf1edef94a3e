"""hybrid_engine.scoring against transformers 5 on small random models of every family: the
log-probabilities of the answer tokens of a ragged experience batch (left-padded prompts,
right-padded answers) equal a padded transformers forward's, the values of a sequence-classification
model at each row's last token equal transformers' own pooling, in fp32; the same at tp 2 (threads,
ranks with different rows) and when the rows are split into several forwards."""
import pytest
import torch
from test_families import FAMILIES, family_model
from test_models import CONFIGS, VOCAB, hf_model, on_threads
from transformers import AutoModelForSequenceClassification

from hybrid_engine.models import prepack
from hybrid_engine.models.layers import Linear
from hybrid_engine.scoring import Scorer

PAD = 1
MODELS = [*CONFIGS, *FAMILIES]


def causal_lm(name: str, **overrides):
    return family_model(name, **overrides) if name in FAMILIES else hf_model(name, **overrides)


def value_model(name: str):
    """The family's sequence-classification model (one label, random weights, norms and biases)."""
    lm = causal_lm(name)
    config = lm.config
    config.num_labels, config.pad_token_id = 1, PAD
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in lm.state_dict().items() if k in model.state_dict()}})
    return model


def experience(prompt_lengths: list[int], answer_lengths: list[int], prompt_width: int, answer_width: int,
               seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never PAD), prompts left-padded and answers right-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(prompt_lengths), prompt_width + answer_width), generator=g)
    prompt = torch.arange(prompt_width) >= prompt_width - torch.tensor(prompt_lengths)[:, None]
    answer = torch.arange(answer_width) < torch.tensor(answer_lengths)[:, None]
    mask = torch.cat([prompt, answer], 1).long()
    return ids.masked_fill(mask == 0, PAD), mask


def hf_answer_logprobs(hf, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -width - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, -width:, None]).squeeze(-1)


BATCH = experience([5, 9, 1, 9, 3], [6, 1, 7, 4, 7], 9, 7)
WIDTH = 7


def answer_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return mask[:, -width:].bool()


@pytest.mark.parametrize("name", MODELS)
def test_answer_logprobs_equal_transformers_padded(name):
    """fp32 within 1e-4 on every answer token, exactly 0 on the padding after each answer."""
    hf = causal_lm(name)
    ids, mask = BATCH
    ours = Scorer.from_hf(hf).token_logprobs(ids, mask, WIDTH)
    real = answer_mask(mask, WIDTH)
    torch.testing.assert_close(ours[real], hf_answer_logprobs(hf, ids, mask, WIDTH)[real], atol=1e-4, rtol=1e-4)
    assert bool((ours[~real] == 0).all())


def test_sliding_window_shorter_than_the_rows():
    hf = family_model("mistral", sliding_window=5)
    ids, mask = BATCH
    ours = Scorer.from_hf(hf).token_logprobs(ids, mask, WIDTH)
    real = answer_mask(mask, WIDTH)
    torch.testing.assert_close(ours[real], hf_answer_logprobs(hf, ids, mask, WIDTH)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["opt_pre", "opt_proj", "llama_gqa", "qwen2", "qwen3", "mistral"])
def test_end_values_equal_transformers_pooling(name):
    """The score head at each row's last real token (OPT with word_embed_proj_dim: after project_out;
    LLaMA-family bodies without the LM head their configs would untie)."""
    model = value_model(name)
    ids, mask = BATCH
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
    torch.testing.assert_close(Scorer.from_hf(model).end_values(ids, mask), expected, atol=1e-4, rtol=1e-4)


def test_rows_split_into_several_forwards_give_the_same_results():
    """max_tokens 12: rows of up to 16 tokens, so most forwards hold one row and the longest rows go
    alone past the bound."""
    model = value_model("llama_gqa")
    ids, mask = BATCH
    whole, split = Scorer.from_hf(model), Scorer.from_hf(model)
    split.max_tokens = 12
    torch.testing.assert_close(split.end_values(ids, mask), whole.end_values(ids, mask), atol=1e-6, rtol=1e-6)
    lm = Scorer.from_hf(hf_model("opt_pre"))
    expected = lm.token_logprobs(ids, mask, WIDTH)
    lm.max_tokens = 12
    torch.testing.assert_close(lm.token_logprobs(ids, mask, WIDTH), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["opt_post", "llama_gqa", "qwen3"])
def test_tensor_parallel_ranks_with_different_rows_match_one(name, monkeypatch):
    """tp 2 on threads: rank 0 scores rows 0, 1, 3, rank 1 rows 2, 4 without their first two (padding)
    columns; each gets its own rows' results, equal to the unsliced model's (vocabulary 311 padded to 312)."""
    hf, values = causal_lm(name), value_model(name)
    ids, mask = BATCH
    expected = Scorer.from_hf(hf).token_logprobs(ids, mask, WIDTH), Scorer.from_hf(values).end_values(ids, mask)
    rows = [[0, 1, 3], [2, 4]]

    def rank_main(rank, group):
        part_ids, part_mask = ids[rows[rank]], mask[rows[rank]]
        if rank == 1:
            assert not part_mask[:, :2].any()
            part_ids, part_mask = part_ids[:, 2:], part_mask[:, 2:]
        options = {"tp_rank": rank, "tp_size": 2, "tp_group": group}
        return (Scorer.from_hf(hf, **options).token_logprobs(part_ids, part_mask, WIDTH),
                Scorer.from_hf(values, **options).end_values(part_ids, part_mask))

    for rank, (logprobs, scores) in enumerate(on_threads(2, rank_main, monkeypatch)):
        torch.testing.assert_close(logprobs, expected[0][rows[rank]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, expected[1][rows[rank]], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_its_reason():
    ids, mask = BATCH
    lm, values = Scorer.from_hf(hf_model("opt_pre")), Scorer.from_hf(value_model("opt_pre"))
    with pytest.raises(ValueError, match="width must be in"):
        lm.token_logprobs(ids, mask, ids.shape[1])
    with pytest.raises(ValueError, match="needs a Scorer built with a value_head"):
        lm.end_values(ids, mask)
    with pytest.raises(ValueError, match="all-padding row"):
        values.end_values(ids, torch.cat([mask[:1] * 0, mask[1:]]))
    with pytest.raises(ValueError, match="outside"):
        values.end_values(ids.masked_fill(mask == 1, VOCAB), mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        values.end_values(ids, mask[:, 1:])


def test_bf16_frozen_packed_weights_score_as_the_plain_model_and_are_held_once():
    """Where every bf16 product goes through oneDNN's packed weights, a Scorer packs its linears once
    and frees their plain weights: results equal a model that keeps both copies (same packed kernels),
    and the linears' plain buffers are empty; the bf16 error is that of transformers in bf16. Elsewhere (e.g. AVX2 without bf16 packing) freezing is
    refused with its reason and the Scorer keeps the plain weights."""
    hf = causal_lm("llama_gqa")
    ids, mask = BATCH
    keeps = Scorer.from_hf(hf, dtype=torch.bfloat16, freeze_packed=False)
    keeps.model.prepack_weights(True)
    frozen = Scorer.from_hf(hf, dtype=torch.bfloat16)
    linears = [m for m in frozen.model.modules() if isinstance(m, Linear)]
    if not prepack.always_used(torch.device("cpu"), torch.bfloat16):
        assert all(m.weight.numel() for m in linears)
        with pytest.raises(ValueError, match="plain weights are still needed"):
            frozen.model.freeze_packed_weights()
        return
    assert all(m.weight.numel() == 0 and m.packed.tensor is not None for m in linears)
    torch.testing.assert_close(frozen.token_logprobs(ids, mask, WIDTH), keeps.token_logprobs(ids, mask, WIDTH),
                               atol=0, rtol=0)
    # bf16 within 1.5x of what bf16 costs transformers itself (max and mean), against fp32 transformers
    real = answer_mask(mask, WIDTH)
    exact = hf_answer_logprobs(hf, ids, mask, WIDTH)[real]
    ours_err = (frozen.token_logprobs(ids, mask, WIDTH)[real] - exact).abs()
    hf_err = (hf_answer_logprobs(hf.to(torch.bfloat16), ids, mask, WIDTH)[real] - exact).abs()
    assert ours_err.max() <= 1.5 * hf_err.max() and ours_err.mean() <= 1.5 * hf_err.mean()
