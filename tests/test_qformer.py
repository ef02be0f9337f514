"""Q-Former (BLIP-2 / InstructBLIP): masks, losses, hard negatives, parity with transformers, bad input.

LAVIS (salesforce/LAVIS, lavis/models/blip2_models/blip2_qformer.py and Qformer.py) is the reference code but does
not import with current packages, so the fixtures below are derived by hand from its published formulas; each
test's docstring carries the derivation. transformers' BLIP-2 / InstructBLIP models are installed and are used
for weight-copy parity.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mmbridge_ref.bridges.qformer import (
    OBJECTIVES, QFormer, QFormerOutput, QFormerPretrainer, itc_loss, itc_similarity, itg_inputs, itg_loss, itm_labels,
    itm_loss, itm_negative_weights, load_hf_qformer, qformer_attention_mask, sample_itm_negatives,
)

T, F_ = True, False


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------- masks
def test_mask_exact_patterns_with_padding():
    """q = 2 queries, t = 3 text tokens; caption 0 has no padding, caption 1 pads its last token.

    Rows/columns are [Q0, Q1, T0, T1, T2]; the padding column (T2 of caption 1) is never attended.
    ITC: two diagonal blocks. ITM: all. ITG: queries -> queries; text row r -> queries and text columns <= r.
    """
    text_mask = torch.tensor([[T, T, T], [T, T, F_]])
    expected = {
        "itc": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]],
        "itm": [[1] * 5] * 5,
        "itg": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1]],
    }
    for obj, pattern in expected.items():
        full = torch.tensor(pattern, dtype=torch.bool)
        got = qformer_attention_mask(2, text_mask, obj)
        assert got.dtype == torch.bool and got.shape == (2, 5, 5)
        assert torch.equal(got[0], full), obj
        padded = full.clone()
        padded[:, 4] = False  # caption 1: column T2 is padding
        assert torch.equal(got[1], padded), obj


def _lavis_itg_mask(num_query, text_mask):
    """LAVIS's ITG ("UniLM-style") mask built the way its Qformer.get_extended_attention_mask describes it:
    a causal [t, t] block for text; prepend q rows of zeros (queries see no text); prepend q columns of ones
    (every row sees every query); multiply by the padding mask [ones(q), text_mask] over columns."""
    b, t = text_mask.shape
    causal = (torch.arange(t)[None, :] <= torch.arange(t)[:, None]).float()  # [t, t]
    rows = torch.cat([torch.zeros(num_query, t), causal], 0)  # [q+t, t]
    full = torch.cat([torch.ones(num_query + t, num_query), rows], 1)  # [q+t, q+t]
    cols = torch.cat([torch.ones(b, num_query), text_mask.float()], 1)
    return (full[None] * cols[:, None, :]).bool()


def _rules(num_query, text_mask, objective):
    "The rules cell by cell (independent of the vectorised implementation)."
    b, t = text_mask.shape
    n = num_query + t
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(b):
        for r in range(n):
            for c in range(n):
                rq, cq = r < num_query, c < num_query
                if not cq and not text_mask[i, c - num_query]: continue
                out[i, r, c] = {"itm": True, "itc": rq == cq, "itg": cq if rq else (cq or c <= r)}[objective]
    return out


@settings(max_examples=60, deadline=None)
@given(q=st.integers(1, 5), b=st.integers(1, 3), t=st.integers(0, 6), data=st.data())
def test_mask_properties(q, b, t, data):
    "Random padding: matches the cell rules; padding columns are never attended; ITG equals LAVIS's construction."
    bits = data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    text_mask = torch.tensor(bits, dtype=torch.bool).reshape(b, t)
    for obj in OBJECTIVES:
        m = qformer_attention_mask(q, text_mask, obj)
        assert m.shape == (b, q + t, q + t)
        assert torch.equal(m, _rules(q, text_mask, obj))
        assert not m[:, :, q:][~text_mask[:, None, :].expand(b, q + t, t)].any()  # padding columns
        assert m[:, :q, :q].all()  # queries always see each other
    assert torch.equal(qformer_attention_mask(q, text_mask, "itg"), _lavis_itg_mask(q, text_mask))
    itm, itc, itg = (qformer_attention_mask(q, text_mask, o) for o in ("itm", "itc", "itg"))
    assert not (itc & ~itm).any() and not (itg & ~itm).any()  # ITM is the most permissive


def test_mask_accepts_integer_padding_masks():
    ints = torch.tensor([[1, 1, 0]])
    assert torch.equal(qformer_attention_mask(2, ints, "itg"), qformer_attention_mask(2, ints.bool(), "itg"))


@pytest.mark.parametrize("num_query, needle", [(0, "num_query=0"), (-3, "num_query=-3"), (2.0, "num_query=2.0"), (True, "num_query=True")])
def test_mask_rejects_bad_num_query(num_query, needle):
    with pytest.raises(ValueError, match=needle):
        qformer_attention_mask(num_query, torch.ones(1, 3, dtype=torch.bool), "itc")


@pytest.mark.parametrize("mask, needle", [
    (torch.ones(3, dtype=torch.bool), r"\(3,\)"),
    (torch.ones(1, 2, 3, dtype=torch.bool), r"\(1, 2, 3\)"),
    (torch.ones(1, 3), "torch.float32"),
    ([[1, 1]], "list"),
])
def test_mask_rejects_bad_text_mask(mask, needle):
    with pytest.raises(ValueError, match=needle):
        qformer_attention_mask(2, mask, "itm")


def test_mask_rejects_unknown_objective():
    with pytest.raises(ValueError, match="objective='lm'"):
        qformer_attention_mask(2, torch.ones(1, 3, dtype=torch.bool), "lm")


# ------------------------------------------------------------------------------------------------------- the model
def _tiny(seed=0, **kw):
    """A small Q-Former whose linear weights are re-drawn with std 0.2 (about 1/sqrt(width)): BERT's 0.02 init makes
    the image's influence ~1% at initialisation, too faint for the "does depend" checks below."""
    torch.manual_seed(seed)
    cfg = dict(vision_dim=24, depth=3, num_queries=4, heads=4, vocab_size=50, max_text_len=8)
    qf = QFormer(32, **{**cfg, **kw}).eval()
    with torch.no_grad():
        for m in qf.modules():
            if isinstance(m, torch.nn.Linear): m.weight.normal_(0, 0.2)
    return qf


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 10, 24, generator=g)
    ids = torch.randint(2, 50, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]).bool()
    return image, ids, mask


def test_output_shapes_and_cross_attention_layout(batch):
    image, ids, mask = batch
    qf = _tiny(depth=5, cross_attention_every=2)
    assert [l.cross_attn is not None for l in qf.layers] == [True, False, True, False, True]
    out = qf(image, ids, mask)
    assert isinstance(out, QFormerOutput) and out.queries.shape == (3, 4, 32) and out.text.shape == (3, 6, 32)
    alone = qf(image)
    assert alone.queries.shape == (3, 4, 32) and alone.text is None
    assert [l.cross_attn is not None for l in _tiny(depth=3, cross_attention_every=1).layers] == [True] * 3


def test_queries_have_their_own_ffn(batch):
    "Changing the query FFN changes query outputs and, in ITC, leaves the text outputs unchanged."
    image, ids, mask = batch
    qf = _tiny()
    before = qf(image, ids, mask, objective="itc")
    with torch.no_grad():
        for layer in qf.layers: layer.ff_query.proj_out.bias.add_(torch.randn(32))  # not a constant: LN removes those
    after = qf(image, ids, mask, objective="itc")
    assert not torch.allclose(before.queries, after.queries, atol=1e-3)
    torch.testing.assert_close(before.text, after.text)


def test_itc_keeps_modalities_apart(batch):
    image, ids, mask = batch
    qf = _tiny()
    ref = qf(image, ids, mask, objective="itc")
    other_text = qf(image, torch.randint(2, 50, ids.shape), mask, objective="itc")
    other_image = qf(torch.randn_like(image), ids, mask, objective="itc")
    torch.testing.assert_close(ref.queries, other_text.queries)
    torch.testing.assert_close(ref.text, other_image.text)
    assert not torch.allclose(ref.queries, other_image.queries, atol=1e-3)  # the queries do read the image
    torch.testing.assert_close(ref.queries, qf(image).queries)


def test_itm_mixes_modalities(batch):
    image, ids, mask = batch
    qf = _tiny()
    ref = qf(image, ids, mask, objective="itm")
    assert not torch.allclose(ref.queries, qf(image, torch.randint(2, 50, ids.shape), mask, objective="itm").queries, atol=1e-3)
    assert not torch.allclose(ref.text, qf(torch.randn_like(image), ids, mask, objective="itm").text, atol=1e-3)


@pytest.mark.parametrize("j", [1, 3, 5])
def test_itg_is_causal_over_text_and_queries_ignore_text(batch, j):
    image, ids, mask = batch
    full = torch.ones_like(mask)
    qf = _tiny()
    changed = ids.clone()
    changed[:, j:] = (changed[:, j:] + 7) % 48 + 2
    a, b = qf(image, ids, full, objective="itg"), qf(image, changed, full, objective="itg")
    torch.testing.assert_close(a.queries, b.queries)
    torch.testing.assert_close(a.text[:, :j], b.text[:, :j])
    assert not torch.allclose(a.text[:, j:], b.text[:, j:], atol=1e-3)
    # the text does see the image, through the queries only
    assert not torch.allclose(a.text, qf(torch.randn_like(image), ids, full, objective="itg").text, atol=1e-3)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padding_changes_nothing(batch, objective):
    "Overwrite padded tokens (and padded image tokens): every non-pad output stays the same."
    image, ids, mask = batch
    qf = _tiny()
    image_mask = torch.ones(3, 10, dtype=torch.bool)
    image_mask[1, 7:] = False
    noisy_ids = torch.where(mask, ids, torch.randint(2, 50, ids.shape))
    noisy_image = torch.where(image_mask[..., None], image, torch.randn_like(image) * 5)
    a = qf(image, ids, mask, objective=objective, image_mask=image_mask)
    b = qf(noisy_image, noisy_ids, mask, objective=objective, image_mask=image_mask)
    torch.testing.assert_close(a.queries, b.queries)
    torch.testing.assert_close(a.text[mask], b.text[mask])


def test_text_as_ids_or_embeddings(batch):
    image, ids, mask = batch
    qf = _tiny()
    torch.testing.assert_close(qf(image, ids, mask).queries, qf(image, qf.embed_text(ids), mask).queries)


def test_instruction_aware_queries(batch):
    "InstructBLIP: instruction tokens join the queries' self-attention (ITM mask) and change what they extract."
    image, ids, mask = batch
    qf = _tiny()
    instr = qf.embed_text(ids)
    q1 = qf(image, instr, mask, objective="itm").queries
    q2 = qf(image, qf.embed_text(torch.randint(2, 50, ids.shape)), mask, objective="itm").queries
    assert q1.shape == (3, 4, 32)
    assert not torch.allclose(q1, q2, atol=1e-4)
    assert not torch.allclose(q1, qf(image).queries, atol=1e-4)


@pytest.mark.parametrize("call, needle", [
    (lambda qf, im, ids, m: qf(im, ids, m[:, :4]), r"text_mask shape \(3, 4\)"),
    (lambda qf, im, ids, m: qf(im, ids, m[:2]), r"text_mask shape \(2, 6\)"),
    (lambda qf, im, ids, m: qf(im[..., :8]), "vision_dim=24"),
    (lambda qf, im, ids, m: qf(im, ids[:2], m[:2]), r"\[b=3"),
    (lambda qf, im, ids, m: qf(im, ids + 60, m), "vocab_size=50"),
    (lambda qf, im, ids, m: qf(im, torch.cat([ids, ids], 1)), "max_text_len=8"),
    (lambda qf, im, ids, m: qf(im, ids, m, objective="mlm"), "objective='mlm'"),
    (lambda qf, im, ids, m: qf(im, objective="mlm"), "objective='mlm'"),  # checked even without text
    (lambda qf, im, ids, m: qf(im, None, m), "without text"),
    (lambda qf, im, ids, m: qf(im, image_mask=torch.ones(3, 9, dtype=torch.bool)), r"image_mask shape \(3, 9\)"),
])
def test_forward_rejects_bad_input(batch, call, needle):
    image, ids, mask = batch
    with pytest.raises(ValueError, match=needle):
        call(_tiny(), image, ids, mask)


@pytest.mark.parametrize("kw, needle", [(dict(num_queries=0), "num_queries=0"), (dict(depth=0), "depth=0"),
                                         (dict(heads=5), "heads=5"), (dict(cross_attention_every=0), "cross_attention_every=0")])
def test_constructor_rejects_bad_sizes(kw, needle):
    with pytest.raises(ValueError, match=needle):
        QFormer(32, **kw)


# ----------------------------------------------------------------------------------------------------------- ITC
def test_itc_similarity_is_max_over_queries():
    """Fixture. Image 0 queries: (1,0), (0,1); image 1: (.6,.8), (-1,0). Texts: t0 = (0,1), t1 = (.8,.6).
    s[0,0] = max(0, 1) = 1; s[0,1] = max(.8, .6) = .8; s[1,0] = max(.8, 0) = .8; s[1,1] = max(.48+.48, -.8) = .96."""
    z = torch.tensor([[[1., 0.], [0., 1.]], [[.6, .8], [-1., 0.]]])
    t = torch.tensor([[0., 1.], [.8, .6]])
    torch.testing.assert_close(itc_similarity(z, t), torch.tensor([[1., .8], [.8, .96]]))
    assert itc_similarity(torch.randn(3, 5, 4), torch.randn(2, 4)).shape == (3, 2)


def test_itc_loss_matches_hand_derivation():
    """LAVIS: sim_i2t = max_k(z_ik . t_j) / temp, sim_t2i the same with images and texts swapped (= sim_i2t^T on one
    device); loss = [CE(sim_i2t, diag; smoothing .1) + CE(sim_t2i, diag; smoothing .1)] / 2.

    Label-smoothed CE of a row l with target y over B classes: (1 - eps) * (-log p_y) + eps * mean_k(-log p_k),
    p = softmax(l). Here S = [[1, .2], [.5, .8]], tau = .5, so the logits are L = [[2, .4], [1, 1.6]].
      row 0 (target 0): lse = log(e^2 + e^.4);   -log p = [lse - 2, lse - .4]
      row 1 (target 1): lse = log(e^1 + e^1.6);  -log p = [lse - 1, lse - 1.6]
    Columns (text-to-image) use L^T = [[2, 1], [.4, 1.6]] the same way.
    """
    S = torch.tensor([[1., .2], [.5, .8]])
    L = [[2., .4], [1., 1.6]]
    Lt = [[2., 1.], [.4, 1.6]]

    def smoothed_ce(rows, eps):
        total = 0.0
        for y, row in enumerate(rows):
            lse = math.log(sum(math.exp(v) for v in row))
            nll = [lse - v for v in row]
            total += (1 - eps) * nll[y] + eps * sum(nll) / len(row)
        return total / len(rows)

    for eps in (0.0, 0.1):
        expected = (smoothed_ce(L, eps) + smoothed_ce(Lt, eps)) / 2
        torch.testing.assert_close(itc_loss(S, 0.5, label_smoothing=eps), torch.tensor(expected))
    assert itc_loss(S, 0.5) != itc_loss(S, 0.5, label_smoothing=0.0)  # the default is BLIP-2's 0.1


def test_itc_loss_rejects_non_square():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        itc_loss(torch.zeros(2, 3), 0.07)


# ----------------------------------------------------------------------------------------------------------- ITM
def test_itm_negative_weights_fixture():
    """LAVIS: weights = softmax(sim, dim=1) + 1e-4, then the diagonal (the positive) is set to 0.
    logits [[0, ln 2, ln 1], ...]: row 0 softmax = [1, 2, 1] / 4 = [.25, .5, .25] -> weights [0, .5001, .2501]."""
    logits = torch.tensor([[0., math.log(2.), 0.], [0., 0., 0.], [1., 2., 3.]])
    w = itm_negative_weights(logits)
    torch.testing.assert_close(w[0], torch.tensor([0., .5001, .2501]))
    torch.testing.assert_close(w[1], torch.tensor([1 / 3 + 1e-4, 0., 1 / 3 + 1e-4]))
    sm = torch.tensor([1., 2., 3.]).softmax(0)
    torch.testing.assert_close(w[2], torch.tensor([sm[0] + 1e-4, sm[1] + 1e-4, 0.]))


@settings(max_examples=50, deadline=None)
@given(b=st.integers(2, 6), scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]), seed=st.integers(0, 2**16))
def test_hard_negatives_never_the_positive(b, scale, seed):
    "LAVIS#617: whatever the similarities (even a diagonal that takes all the softmax mass), the positive is never drawn."
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, b, generator=g) * scale
    if seed % 2: logits += torch.eye(b) * abs(scale) * 10  # over-confident positives
    assert (itm_negative_weights(logits).diagonal() == 0).all()
    for _ in range(10):
        neg = sample_itm_negatives(logits, generator=g)
        assert neg.image_for_text.shape == neg.text_for_image.shape == (b,)
        assert (neg.image_for_text != torch.arange(b)).all()
        assert (neg.text_for_image != torch.arange(b)).all()
        assert ((0 <= neg.image_for_text) & (neg.image_for_text < b)).all()


def test_hard_negatives_follow_the_similarity():
    """Rows are anchors: text_for_image uses rows of the image-to-text logits, image_for_text uses columns.
    Image 0 is most similar to text 2 and text 1 is most similar to image 2: those are drawn almost always."""
    logits = torch.zeros(3, 3)
    logits[0, 2] = 20.0
    logits[2, 1] = 20.0
    g = torch.Generator().manual_seed(0)
    draws = [sample_itm_negatives(logits, generator=g) for _ in range(50)]
    assert sum(int(d.text_for_image[0]) == 2 for d in draws) >= 49
    assert sum(int(d.image_for_text[1]) == 2 for d in draws) >= 49


def test_itm_batch_size_one_is_an_error():
    with pytest.raises(ValueError, match="batch size 1 < 2"):
        sample_itm_negatives(torch.zeros(1, 1))


def test_itm_rejects_non_finite():
    with pytest.raises(ValueError, match="inf or NaN"):
        itm_negative_weights(torch.tensor([[0., float("inf")], [0., 0.]]))


def test_itm_labels_and_loss_fixture():
    """Labels [1]*B + [0]*2B. Logits per row (not-match, match); with B = 1 rows = [(0, ln 3), (0, 0), (ln 3, 0)]:
    p(label) = 3/4, 1/2, 3/4 -> loss = -(ln .75 + ln .5 + ln .75) / 3."""
    assert itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]
    l3 = math.log(3)
    logits = torch.tensor([[0., l3], [0., 0.], [l3, 0.]])
    expected = -(math.log(.75) + math.log(.5) + math.log(.75)) / 3
    torch.testing.assert_close(itm_loss(logits), torch.tensor(expected))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        itm_loss(torch.zeros(4, 2))


# ----------------------------------------------------------------------------------------------------------- ITG
def test_itg_inputs_swap_bos_and_mask_padding():
    ids = torch.tensor([[101, 5, 6, 7], [101, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    got = itg_inputs(ids, mask, bos_id=3)
    assert got.input_ids.tolist() == [[3, 5, 6, 7], [3, 8, 9, 0]]
    assert got.labels.tolist() == [[3, 5, 6, 7], [3, 8, 9, -100]]
    assert ids[0, 0] == 101  # the caller's ids are not modified


def test_itg_loss_matches_hand_derivation():
    """LAVIS BertLMHeadModel: logits[:, :-1] against labels[:, 1:], CE(ignore -100, label smoothing .1), mean over
    supervised tokens. One caption, vocab 3, labels [BOS, 2, 0, -100]: targets of positions 0, 1 are 2 and 0;
    position 2's target is -100 (ignored), position 3 has no next token.
    logits pos 0 = (0, 0, ln 2) -> p = (1/4, 1/4, 1/2); pos 1 = (ln 3, 0, 0) -> p = (3/5, 1/5, 1/5).
    smoothed nll = (1-eps)(-log p_y) + eps * mean_k(-log p_k)."""
    logits = torch.tensor([[[0., 0., math.log(2)], [math.log(3), 0., 0.], [5., 0., 0.], [0., 9., 0.]]])
    labels = torch.tensor([[1, 2, 0, -100]])

    def nll(p, y, eps):
        return (1 - eps) * -math.log(p[y]) + eps * sum(-math.log(v) for v in p) / len(p)

    for eps in (0.0, 0.1):
        expected = (nll([.25, .25, .5], 2, eps) + nll([.6, .2, .2], 0, eps)) / 2
        torch.testing.assert_close(itg_loss(logits, labels, label_smoothing=eps), torch.tensor(expected))


def test_itg_loss_without_supervised_tokens_is_an_error():
    with pytest.raises(ValueError, match="no supervised token"):
        itg_loss(torch.zeros(1, 3, 5), torch.tensor([[1, -100, -100]]))


# ----------------------------------------------------------------------------------------------------- stage 1
def test_pretrainer_losses_and_gradients(batch):
    image, ids, mask = batch
    pre = QFormerPretrainer(_tiny(), bos_id=1, embed_dim=16)
    losses = pre(image, ids, mask, generator=torch.Generator().manual_seed(0))
    for v in (losses.itc, losses.itm, losses.itg):
        assert v.ndim == 0 and torch.isfinite(v)
    losses.total.backward()
    for name in ("qformer.queries", "temperature", "itm_head.weight", "vision_proj.weight", "qformer.token_emb.weight"):
        assert dict(pre.named_parameters())[name].grad.abs().sum() > 0, name
    assert pre.lm_head.weight is pre.qformer.token_emb.weight


def test_pretrainer_itm_batch_layout(batch, monkeypatch):
    "The ITM pass sees images [pos, neg, pos] and texts [pos, pos, neg] with the sampled negatives."
    image, ids, mask = batch
    pre = QFormerPretrainer(_tiny(), bos_id=1, embed_dim=16)
    seen = {}
    forward = pre.qformer.forward

    def spy(img, text=None, text_mask=None, *, objective="itm", image_mask=None):
        if objective == "itm": seen.update(img=img, text=text, mask=text_mask)
        return forward(img, text, text_mask, objective=objective, image_mask=image_mask)

    monkeypatch.setattr(pre.qformer, "forward", spy)
    import mmbridge_ref.bridges.qformer as mod
    drawn = []
    sampler = mod.sample_itm_negatives
    monkeypatch.setattr(mod, "sample_itm_negatives", lambda *a, **k: drawn.append(sampler(*a, **k)) or drawn[-1])
    pre(image, ids, mask, generator=torch.Generator().manual_seed(3))
    neg = drawn[0]
    b = 3
    assert seen["img"].shape[0] == seen["text"].shape[0] == 3 * b
    torch.testing.assert_close(seen["img"][:b], image)
    torch.testing.assert_close(seen["img"][2 * b:], image)
    torch.testing.assert_close(seen["text"][:b], ids)
    torch.testing.assert_close(seen["text"][b:2 * b], ids)
    torch.testing.assert_close(seen["mask"][2 * b:], mask[neg.text_for_image])
    torch.testing.assert_close(seen["img"][b:2 * b], image[neg.image_for_text])
    torch.testing.assert_close(seen["text"][2 * b:], ids[neg.text_for_image])


def test_pretrainer_batch_of_one_is_an_error(batch):
    image, ids, mask = batch
    pre = QFormerPretrainer(_tiny(), bos_id=1, embed_dim=16)
    with pytest.raises(ValueError, match="batch size 1 < 2"):
        pre(image[:1], ids[:1], mask[:1])


def test_pretrainer_learns_a_fixed_batch(batch):
    "Smoke: 30 AdamW steps on one batch lower the summed loss."
    image, ids, mask = batch
    torch.manual_seed(0)
    pre = QFormerPretrainer(QFormer(32, vision_dim=24, depth=2, num_queries=4, heads=4, vocab_size=50, max_text_len=8),
                            bos_id=1, embed_dim=16)
    opt = torch.optim.AdamW(pre.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        loss = pre(image, ids, mask, generator=g).total
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (first, loss.item())


def test_pretrainer_rejects_bad_bos():
    with pytest.raises(ValueError, match="bos_id=99"):
        QFormerPretrainer(_tiny(), bos_id=99)


# ------------------------------------------------------------------------------------- parity with transformers
QCFG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            cross_attention_frequency=2, encoder_hidden_size=24, max_position_embeddings=8)


def _jitter(model, seed):
    "transformers zero-initialises queries and sets LayerNorms to (1, 0): randomise so that parity is not trivial."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf_retrieval():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                         image_size=16, patch_size=4),
                      qformer_config=dict(QCFG, use_qformer_text_input=True), num_query_tokens=4, image_text_hidden_size=16)
    return _jitter(Blip2ForImageTextRetrieval(cfg).eval(), 0)


def _ours_from(hf):
    qf = _tiny(seed=5)
    return load_hf_qformer(qf, hf.qformer, query_tokens=hf.query_tokens, embeddings=hf.embeddings)


def test_queries_match_blip2_qformer_model(hf_retrieval):
    "Blip2QFormerModel, queries only, with padded image tokens."
    hf, qf = hf_retrieval, _ours_from(hf_retrieval)
    feats = torch.randn(3, 10, 24)
    image_mask = torch.ones(3, 10, dtype=torch.bool)
    image_mask[2, 6:] = False
    with torch.no_grad():
        ref = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=feats,
                         encoder_attention_mask=image_mask.long()).last_hidden_state
        torch.testing.assert_close(qf(feats, image_mask=image_mask).queries, ref, atol=1e-5, rtol=1e-5)


def test_itc_similarity_and_itm_scores_match_blip2_retrieval(hf_retrieval):
    "Blip2ForImageTextRetrieval: cosine max-over-queries logits (ITC head) and query-averaged ITM logits."
    hf = hf_retrieval
    qf = _ours_from(hf)
    pre = QFormerPretrainer(qf, bos_id=1, embed_dim=16).eval()
    with torch.no_grad():
        for ours, ref in [(pre.vision_proj, hf.vision_projection), (pre.text_proj, hf.text_projection), (pre.itm_head, hf.itm_head)]:
            ours.load_state_dict(ref.state_dict())
        pixels = torch.randn(3, 3, 16, 16)
        ids = torch.randint(2, 50, (3, 7))
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]).bool()
        feats = hf.vision_model(pixel_values=pixels).last_hidden_state
        out = qf(feats, ids, mask, objective="itc")
        sim = itc_similarity(F.normalize(pre.vision_proj(out.queries), dim=-1), F.normalize(pre.text_proj(out.text[:, 0]), dim=-1))
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask.long()).logits_per_image
        torch.testing.assert_close(sim, ref, atol=1e-5, rtol=1e-5)
        itm = pre.itm_head(qf(feats, ids, mask, objective="itm").queries).mean(1)
        ref_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask.long(), use_image_text_matching_head=True).logits_per_image
        torch.testing.assert_close(itm, ref_itm, atol=1e-5, rtol=1e-5)


def test_instruction_aware_queries_match_instructblip():
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    torch.manual_seed(1)
    hf = _jitter(InstructBlipQFormerModel(InstructBlipQFormerConfig(**QCFG)).eval(), 1)
    queries = torch.randn(1, 4, 32)
    qf = load_hf_qformer(_tiny(seed=7), hf, query_tokens=queries)
    feats, instr = torch.randn(2, 10, 24), torch.randint(2, 50, (2, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]).bool()
    with torch.no_grad():
        ref = hf(input_ids=instr, attention_mask=torch.cat([torch.ones(2, 4), mask], 1).long(),
                 query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=feats).last_hidden_state
        torch.testing.assert_close(qf(feats, instr, mask, objective="itm").queries, ref[:, :4], atol=1e-5, rtol=1e-5)


def test_load_hf_qformer_rejects_size_mismatch(hf_retrieval):
    with pytest.raises(ValueError, match="depth: ours 2 != reference 3"):
        load_hf_qformer(_tiny(depth=2), hf_retrieval.qformer, query_tokens=hf_retrieval.query_tokens)
    with pytest.raises(ValueError, match="queries: ours"):
        load_hf_qformer(_tiny(num_queries=5), hf_retrieval.qformer, query_tokens=hf_retrieval.query_tokens)
    with pytest.raises(ValueError, match="cross-attention"):
        load_hf_qformer(_tiny(cross_attention_every=1), hf_retrieval.qformer, query_tokens=hf_retrieval.query_tokens)


def test_text_init_from_a_wider_lm_keeps_the_words_geometry():
    "A Q-Former narrower than the LM starts from the LM's embeddings on their leading principal directions."
    import torch
    from mmbridge_ref.bridges.qformer import QFormer, init_text_embeddings
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 8, generator=g) @ torch.randn(8, 32, generator=g)  # rank 8 in a 32-wide LM
    q = init_text_embeddings(QFormer(16, vision_dim=8, depth=2, num_queries=2, heads=2, vocab_size=42), w)
    e = q.token_emb.weight[:40].detach().double()
    assert torch.allclose(torch.cdist(e, e), torch.cdist(w.double(), w.double()), rtol=1e-4, atol=1e-3)  # every distance between words kept
    same = init_text_embeddings(QFormer(32, vision_dim=8, depth=2, num_queries=2, heads=2, vocab_size=42), w)
    assert torch.equal(same.token_emb.weight[:40], w)  # equal widths: a copy
    with pytest.raises(ValueError, match=r"\(40, 32\).*at least the Q-Former's"):
        init_text_embeddings(QFormer(64, vision_dim=8, depth=2, num_queries=2, heads=2, vocab_size=42), w)
