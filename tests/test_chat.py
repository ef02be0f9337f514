"""Chat templates and label masks (nbs/40_llava.ipynb): labels come from the templates' {% generation %} spans,
never from cutting strings; every bad sample is an error that names it."""
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmbridge_ref.backbones.towers import ROOT, ZOO_DIR, load_tokenizer, save_tokenizer, tiny_lm, train_tokenizer
from mmbridge_ref.data import shapesworld as sw
from mmbridge_ref.data.chat import (DEFAULT_TEMPLATE, MC_ANSWER, SHORT_ANSWER, SYSTEM, TEMPLATES, add_chat_templates,
                                    tokenize_conversation)
from mmbridge_ref.vlm import encode_segments

TOK = load_tokenizer(ZOO_DIR / "lm")
IMAGE = TOK.convert_tokens_to_ids("<image>")
WORDS = sorted({w for group in (sw.COLOURS, sw.SHAPES, sw.SIZES, sw.POSITIONS, sw.NUMBERS) for phrase in group
                for w in phrase.split()} | {"is", "there", "a", "the", "it", "yes", "no", "what", "where", "?", ".", ","})
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U = {"role": "user", "content": "<image>\nwhat colour is the circle ?"}
A = {"role": "assistant", "content": "red"}


def msg(role, content): return {"role": role, "content": content}


@st.composite
def conversations(draw, words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join), max_turns=4):
    "Random ShapesWorld-worded conversations: 1..max_turns exchanges, <image> in the first user turn or not, a system message or not."
    image, n = draw(st.booleans()), draw(st.integers(1, max_turns))
    msgs = [msg("system", draw(words))] if draw(st.booleans()) else []
    for t in range(n):
        msgs += [msg("user", ("<image>\n" if image and t == 0 else "") + draw(words)), msg("assistant", draw(words))]
    return msgs


def runs(labels):
    "Maximal runs of consecutive supervised positions."
    out, cur = [], []
    for k, l in enumerate(labels):
        if l != -100: cur.append(k)
        elif cur: out.append(cur); cur = []
    return out + ([cur] if cur else [])


def check_labels(msgs, template, tok=TOK):
    out = tokenize_conversation(msgs, tok, template=template)
    ids, labels = out["input_ids"], out["labels"]
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert set(out) == {"input_ids", "labels"} and isinstance(ids, list) and isinstance(labels, list)
    assert len(labels) == len(ids) and all(isinstance(i, int) for i in ids + labels)
    assert all(l in (-100, i) for i, l in zip(ids, labels))  # labels copy the ids where supervised: not shifted
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    assert ids.count(IMAGE) == sum(m["content"].count("<image>") for m in msgs if m["role"] == "user") and IMAGE not in labels
    spans = runs(labels)
    assert len(spans) == len(replies)  # one supervised span per reply
    for span, reply in zip(spans, replies):
        assert ids[span[-1]] == tok.eos_token_id and tok.eos_token_id not in [ids[k] for k in span[:-1]]  # closed by its eos
        assert tok.decode([ids[k] for k in span[:-1]]).strip() == reply.strip()  # decoding a span gives the reply back
    # -100 everywhere else: the unsupervised tokens spell the rendered text without the replies and their eos
    rest = tok.apply_chat_template(msgs, chat_template=TEMPLATES[template], tokenize=False)
    for r in replies: rest = rest.replace(r + tok.eos_token, "", 1)
    unsupervised = tok.decode([i for i, l in zip(ids, labels) if l == -100])
    assert "".join(unsupervised.split()) == "".join(rest.split())
    # what is supervised is exactly what generation must write after the template's generation prompt
    positions = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    for span, k in zip(spans, positions):
        prompt = tok.apply_chat_template(msgs[:k], chat_template=TEMPLATES[template], add_generation_prompt=True,
                                         return_dict=False)
        assert ids[:span[0]] == prompt
    return out


@SETTINGS
@given(conversations(), st.sampled_from(["llava_v1", "zoo"]))
def test_labels_on_replies_and_their_eos_only(msgs, template):
    check_labels(msgs, template)


@SETTINGS
@given(conversations(max_turns=1))
def test_plain_labels_the_caption(msgs):
    out = check_labels(msgs, "plain")
    has_image = "<image>" in msgs[-2]["content"]
    assert out["input_ids"][:1 + has_image] == [TOK.bos_token_id] + [IMAGE] * has_image  # the user's words are dropped


TEXT = st.text(alphabet=string.ascii_letters + string.digits + " \n\t.,;:?!'\"()-éßø→", min_size=1, max_size=30)


@SETTINGS
@given(conversations(words=TEXT.filter(lambda s: s.strip()), max_turns=3), st.sampled_from(["llava_v1", "zoo"]))
def test_labels_on_arbitrary_text(msgs, template):
    "Byte-level BPE encodes any text; the spans still hold exactly the replies (up to surrounding whitespace)."
    out = tokenize_conversation(msgs, TOK, template=template)
    spans, replies = runs(out["labels"]), [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies):
        assert out["input_ids"][span[-1]] == TOK.eos_token_id
        assert TOK.decode([out["input_ids"][k] for k in span[:-1]]).strip() == reply.strip()


def test_llava_v1_rendered_by_hand():
    msgs = [msg("user", "<image>\nwhat colour is the circle ?"), msg("assistant", "red"),
            msg("user", "where is it ?"), msg("assistant", "top left")]
    system = ("The user shows the assistant a picture and asks about it; "
              "the assistant answers from what the picture shows, briefly and exactly.")
    expected = (f"<s>{system} USER: <image>\nwhat colour is the circle ? ASSISTANT: red</s>"
                "USER: where is it ? ASSISTANT: top left</s>")
    assert SYSTEM == system
    assert TOK.apply_chat_template(msgs, chat_template="llava_v1", tokenize=False) == expected
    assert TOK.apply_chat_template(msgs, tokenize=False) == expected  # llava_v1 is the default
    with_system = TOK.apply_chat_template([msg("system", "Be brief.")] + msgs, tokenize=False)
    assert with_system == expected.replace(system, "Be brief.")
    assert TOK.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True) == expected[:-len(" top left</s>")]


def test_plain_and_zoo_rendered_by_hand():
    cap = [msg("user", "<image>\ndescribe the image ."), msg("assistant", "a red circle .")]
    assert TOK.apply_chat_template(cap, chat_template="plain", tokenize=False) == "<s><image>a red circle .</s>"
    msgs = cap + [msg("user", "how many shapes ?"), msg("assistant", "one")]
    assert TOK.apply_chat_template(msgs, chat_template="zoo", tokenize=False) == (
        "<s><image> user : describe the image . assistant : a red circle .</s> user : how many shapes ? assistant : one</s>")


def test_zoo_template_is_the_zoo_lms_pretraining_format():
    "Token for token, a zoo-template sample is an episode of 07_zoo_lm with <image> where the note was."
    q, a = "where is the small green shape ?", "it is at the bottom right ."
    out = tokenize_conversation([msg("user", f"<image>\n{q}"), msg("assistant", a)], TOK, template="zoo")
    ids, labels = encode_segments(TOK, [(f"<image> user : {q} assistant :", False), (a, True)], num_media=1)
    assert (out["input_ids"], out["labels"]) == (ids, labels)


def test_image_stays_one_special_token():
    assert "<image>" in TOK.all_special_tokens
    assert TOK("<image>", add_special_tokens=False).input_ids == [IMAGE]
    for template in TEMPLATES:
        ids = tokenize_conversation([msg("user", "<image>\nwhat is it ?"), msg("assistant", "a circle")], TOK, template=template)["input_ids"]
        assert ids.count(IMAGE) == 1, template
        assert "<" not in TOK.decode([i for i in ids if i != IMAGE], skip_special_tokens=True)  # no spelled-out pieces


@pytest.mark.parametrize("msgs, match", [
    ([U, msg("assistant", "")], "sample 'x7': message 1 is an empty assistant reply"),
    ([U, msg("assistant", " \n")], "sample 'x7': message 1 is an empty assistant reply"),
    ([A, U], "sample 'x7': message 0 is 'assistant' where 'user' was due"),
    ([U, U, A], "message 1 is 'user' where 'assistant' was due"),
    ([U, A, A], "message 2 is 'assistant' where 'user' was due"),
    ([msg("system", "hi"), A], "message 1 is 'assistant' where 'user' was due"),
    ([U, A, msg("system", "hi"), A], "message 2 is 'system' where 'user' was due"),
    ([U, A, U], "sample 'x7': the last message is 'user'"),
    ([msg("system", "hi")], "the last message is 'system'"),
    ([U, msg("gpt", "red")], "sample 'x7': message 1 has the unknown role 'gpt'"),
    ([U, {"content": "red"}], "message 1 has the unknown role None"),
    ([U, msg("assistant", "<image> red")], "message 1, an assistant reply, holds <image>"),
    ([U, msg("assistant", None)], "message 1 must be a dict with a 'role' and a str 'content'"),
    ([], "sample 'x7': messages must be a non-empty list"),
])
def test_bad_conversations_name_the_sample(msgs, match):
    with pytest.raises(ValueError, match=match.replace("?", r"\?")):
        tokenize_conversation(msgs, TOK, name="x7")


def test_plain_refuses_more_than_one_exchange():
    with pytest.raises(ValueError, match="sample 3: template 'plain' refuses it: plain takes one picture and one caption"):
        tokenize_conversation([U, A, U, A], TOK, template="plain", name=3)


def test_unknown_template_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"template='llava' is not one of \['default', 'llava_v1', 'plain', 'zoo'\]"):
        tokenize_conversation([U, A], TOK, template="llava")
    bare = train_tokenizer(["a red circle"] * 4, vocab_size=300)  # no templates of its own: ours are the choice
    with pytest.raises(ValueError, match=r"template='vicuna' is not one of \['llava_v1', 'plain', 'zoo'\]"):
        tokenize_conversation([U, A], bare, template="vicuna")
    with pytest.raises(ValueError, match="default='vicuna' is not one of"):
        add_chat_templates(bare, default="vicuna")


def test_a_template_that_supervises_nothing_is_an_error():
    tok = train_tokenizer(["a red circle at the top left ."] * 4, vocab_size=300)
    tok.chat_template = {"unmarked": "{{ bos_token }}{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"}
    with pytest.raises(ValueError, match="sample 9: every label is -100 under template 'unmarked'"):
        tokenize_conversation([U, A], tok, template="unmarked", name=9)


def test_image_spelled_in_pieces_is_an_error():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    raw.train_from_iterator(["a red circle"] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="sample 10: 1 <image> in the text became 0 <image> tokens"):
        tokenize_conversation([U, A], tok, name=10)
    assert tokenize_conversation([msg("user", "hi"), A], tok)["labels"][-1] == tok.eos_token_id  # without <image> it is fine


def test_a_tokenizer_without_templates_uses_ours():
    bare = train_tokenizer(["a red circle at the top left ."] * 4, vocab_size=300)
    msgs = [U, A, msg("user", "where ?"), msg("assistant", "top left")]
    plain = {t: tokenize_conversation(msgs[:2] if t == "plain" else msgs, bare, template=t) for t in TEMPLATES}
    add_chat_templates(bare)
    assert plain == {t: tokenize_conversation(msgs[:2] if t == "plain" else msgs, bare, template=t) for t in TEMPLATES}


def test_add_chat_templates_keeps_other_named_templates():
    tok = train_tokenizer(["a red circle"] * 4, vocab_size=300)
    tok.chat_template = {"mine": "{{ messages[0]['content'] }}", "llava_v1": "stale"}
    add_chat_templates(tok, default="zoo")
    assert tok.chat_template == {"mine": "{{ messages[0]['content'] }}", **TEMPLATES, "default": TEMPLATES["zoo"]}


@pytest.mark.parametrize("folder", ["lm", "tokenizer"])
def test_committed_zoo_carries_the_templates(folder):
    path = ROOT / "data_samples" / "zoo" / folder
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok.chat_template, dict)
    assert {k: tok.chat_template[k] for k in TEMPLATES} == TEMPLATES
    assert tok.chat_template["default"] == TEMPLATES[DEFAULT_TEMPLATE] == TEMPLATES["llava_v1"]
    msgs = [U, A, msg("user", "where is it ?"), msg("assistant", "top left")]
    assert tokenize_conversation(msgs, tok) == tokenize_conversation(msgs, load_tokenizer(path))


def test_templates_survive_save_and_load():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_tokenizer(add_chat_templates(train_tokenizer(["a red circle at the top left ."] * 4, vocab_size=300)), d / "tok")
        assert (d / "tok" / "chat_template.jinja").read_text() == TEMPLATES["llava_v1"]
        assert sorted(p.name for p in (d / "tok" / "additional_chat_templates").iterdir()) == sorted(f"{t}.jinja" for t in TEMPLATES)
        for tok in (AutoTokenizer.from_pretrained(d / "tok"), load_tokenizer(d / "tok")):
            assert {k: tok.chat_template[k] for k in TEMPLATES} == TEMPLATES
        tiny_lm(load_tokenizer(d / "tok"), dim=32, depth=1, heads=2).save_pretrained(d / "lm")  # as build_zoo saves an LM
        assert AutoTokenizer.from_pretrained(d / "lm").chat_template["zoo"] == TEMPLATES["zoo"]


def test_zoo_build_writes_the_templates():
    from mmbridge_ref.recipes.zoo import _train_tokenizer
    with tempfile.TemporaryDirectory() as d:
        _train_tokenizer(Path(d), quick=True)
        tok = AutoTokenizer.from_pretrained(Path(d) / "tokenizer")
        assert {k: tok.chat_template[k] for k in TEMPLATES} == TEMPLATES


def test_response_format_prompts():
    assert SHORT_ANSWER == "Answer the question using a single word or phrase."
    assert MC_ANSWER == "Answer with the option's letter from the given choices directly."
    out = tokenize_conversation([msg("user", f"<image>\nwhat colour is the circle ?\n{SHORT_ANSWER}"), A], TOK)
    assert TOK.decode([l for l in out["labels"] if l != -100]) == " red</s>"  # the one-word answer is a target
