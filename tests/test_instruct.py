"""Instruction data from scene graphs (nbs/71_instruct.ipynb): every answer equals a brute-force reading of the scene,
samples are deterministic, the compositional split holds, and LLaVA turns convert to chat messages and back."""
import random
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmbridge_ref.data.instruct import (GENERATORS, INSTRUCT_KINDS, LLAVA15_WEIGHTS, MC_ANSWER, REASONING_FORMS,
                                        SHORT_ANSWER, LlavaInstruct, conversation, conversations_to_messages, detail,
                                        messages_to_conversations, multiple_choice, reasoning, scene_from_meta,
                                        short_answer)
from mmbridge_ref.data.shapesworld import (COLOURS, HELD_OUT, IMAGE_TOKEN, NUMBERS, POSITIONS, SHAPES, SIZES,
                                           caption_is_true, sample_scene)

# ---------------------------------------------------------------- a brute-force oracle that reads the question text
REL = {"above": lambda o, r: o.row < r.row, "below": lambda o, r: o.row > r.row,
       "to the left of": lambda o, r: o.col < r.col, "to the right of": lambda o, r: o.col > r.col}
STEP = {"above": (-1, 0), "below": (1, 0), "to the left of": (0, -1), "to the right of": (0, 1)}
RELS = "|".join(REL)
POS = "|".join(sorted(POSITIONS, key=len, reverse=True))
TRIPLE = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"


def matching(ref, objs):
    """Objects that have every attribute the phrase names ('the large circle', 'the shape at the top left')."""
    pos = re.search(rf"at the ({POS})\b", ref)
    words = set(re.sub(rf"at the ({POS})\b", "", ref).split())
    return [o for o in objs if (pos is None or o.position == pos[1])
            and all(w == getattr(o, a) for a, ws in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES))
                    for w in ws if w in words)]


def the_one(ref, objs):
    hits = matching(ref, objs)
    assert len(hits) == 1, f"{ref!r} names {len(hits)} objects"
    return hits[0]


def triple(o):
    return (o.size, o.colour, o.shape)


def singular(plural):
    return plural[:-2] if plural.endswith("sses") else plural[:-1]


def oracle(q, objs):
    """The true answer to any question the generators ask: a word, a phrase, or a set of (size, colour, shape)."""
    if m := re.fullmatch(r"(?:what colour is|which colour does) (.+?)(?: have)? \?", q): return the_one(m[1], objs).colour
    if m := re.fullmatch(r"(?:what shape is|what kind of shape is) (.+) \?", q): return the_one(m[1], objs).shape
    if m := re.fullmatch(r"(?:where is|in which part of the image is) (.+) \?", q): return the_one(m[1], objs).position
    if m := re.fullmatch(r"(?:is (.+) small or large|how big is (.+)) \?", q): return the_one(m[1] or m[2], objs).size
    if re.fullmatch(r"how many (?:shapes are there|shapes can you see|objects are in the image) \?", q): return NUMBERS[len(objs)]
    if m := re.fullmatch(rf"is there an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) \?", q):
        return "yes" if any(o.pair == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(rf"is there a shape at the ({POS}) \?", q): return "yes" if any(o.position == m[1] for o in objs) else "no"
    if m := re.fullmatch(r"(?:are there (\w+) shapes|is there (one) shape) \?", q):
        return "yes" if NUMBERS.index(m[1] or m[2]) == len(objs) else "no"
    if m := re.fullmatch(rf"is (.+) ({'|'.join(COLOURS)}) \?", q): return "yes" if the_one(m[1], objs).colour == m[2] else "no"
    if m := re.fullmatch(rf"how many shapes are ({RELS}) (.+) \?", q):
        r = the_one(m[2], objs); return NUMBERS[sum(REL[m[1]](o, r) for o in objs)]
    if m := re.fullmatch(rf"(?:which shapes are|what is) ({RELS}) (.+) \?", q):
        r = the_one(m[2], objs); return {triple(o) for o in objs if REL[m[1]](o, r)}
    if m := re.fullmatch(rf"what is directly ({RELS}) (.+) \?", q):
        r = the_one(m[2], objs); dr, dc = STEP[m[1]]
        return {triple(o) for o in objs if (o.row, o.col) == (r.row + dr, r.col + dc)}
    if m := re.fullmatch(r"how many (?:shapes are (\w+)|(\w+) shapes are there) \?", q):
        v = m[1] or m[2]; return NUMBERS[sum(v in (o.colour, o.size) for o in objs)]
    if m := re.fullmatch(r"how many (\w+) are there \?", q): return NUMBERS[sum(o.shape == singular(m[1]) for o in objs)]
    raise AssertionError(f"the oracle cannot read {q!r}")


def questions_and_answers(conv):
    """(question without <image> and format prompt, answer) per exchange, checking LLaVA's layout on the way."""
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) % 2 == 0
    assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
    assert sum(t["value"].count(IMAGE_TOKEN) for t in conv) == 1
    return [(conv[k]["value"].removeprefix(IMAGE_TOKEN + "\n"), conv[k + 1]["value"]) for k in range(0, len(conv), 2)]


def scenes(seed, n=1, min_objects=1, max_objects=6, split="all"):
    rng = random.Random(seed)
    return [(sample_scene(rng, min_objects, max_objects, split), rng) for _ in range(n)]


# ---------------------------------------------------------------- answers against brute force
def check_reasoning(sc, rng, form=None):
    (q, a), = questions_and_answers(reasoning(sc, rng, form=form))
    tail = a.rsplit("so the answer is ", 1)[1].removesuffix(" .")
    said = tail if tail in NUMBERS else {m for m in re.findall(TRIPLE, tail)}
    assert said == oracle(q, sc.objects), (q, a)
    if isinstance(said, set) and not said: assert tail == "nothing"
    return q


@pytest.mark.parametrize("form", REASONING_FORMS)
def test_reasoning_answers_equal_brute_force_over_many_scenes(form):
    for sc, rng in scenes(form, 1500):
        check_reasoning(sc, rng, form)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 9))
def test_reasoning_property(seed, n_max):
    sc, rng = scenes(seed, 1, 1, n_max)[0]
    check_reasoning(sc, rng)


def test_reasoning_reaches_every_answer_shape():
    """Zero, one and several hits, and the grid edge in `neighbour`, all occur (the oracle is not vacuous)."""
    counts, edge, empty = set(), 0, 0
    for sc, rng in scenes(99, 2000):
        (q, a), = questions_and_answers(reasoning(sc, rng))
        truth = oracle(q, sc.objects)
        counts.add(truth if isinstance(truth, str) else len(truth))
        edge += "no cell is directly" in a
        empty += "is empty" in a
    assert {"zero", "one", "two", "three", 0, 1, 2} <= counts and edge > 50 and empty > 50


def test_conversation_answers_are_true_sentences():
    kinds = set()
    for sc, rng in scenes(1, 800):
        qa = questions_and_answers(conversation(sc, rng))
        assert 2 <= len(qa) <= 4 and len({q for q, _ in qa}) == len(qa)
        for q, a in qa:
            truth = oracle(q, sc.objects)
            if truth in ("yes", "no"):
                assert a.startswith(truth), (q, a)
                pair = re.fullmatch(r"is there an? (\w+) (\w+) \?", q).groups()
                if truth == "yes":  # every object of that pair, each at its cell
                    named = {(m[:3], m[3]) for m in re.findall(rf"the {TRIPLE} is at the ({POS})", a)}
                    assert named == {(triple(o), o.position) for o in sc.objects if o.pair == pair}, (q, a)
                kinds.add("exists")
            elif truth in NUMBERS:
                assert re.fullmatch(rf"there (is|are) {truth} shapes? \.", a), (q, a); kinds.add("count")
            else:
                ref = re.search(r"(?:is|does) (the .+?) (?:\?|small or large|have)", q)[1]
                assert a.startswith(ref + " is ") and a.endswith(f" {truth} ."), (q, a); kinds.add(q.split()[0])
    assert kinds >= {"exists", "count", "what", "where", "is"}


def test_short_answer_and_multiple_choice_answers_equal_brute_force():
    for sc, rng in scenes(2, 1500, split="train", max_objects=4):
        for q, a in questions_and_answers(short_answer(sc, rng)):
            q, prompt = q.rsplit("\n", 1)
            assert prompt == SHORT_ANSWER and a == oracle(q, sc.objects) and len(a.split()) <= 2, (q, a)
        (q, a), = questions_and_answers(multiple_choice(sc, rng))
        q, *options, prompt = q.split("\n")
        letters = [o.split(". ", 1)[0] for o in options]
        values = [o.split(". ", 1)[1] for o in options]
        assert prompt == MC_ANSWER and letters == list("ABCD") and len(set(values)) == 4
        assert values[letters.index(a)] == oracle(q, sc.objects), (q, options, a)


def test_multiple_choice_letters_are_spread_and_option_count_is_honoured():
    letters = [multiple_choice(sc, rng)[1]["value"] for sc, rng in scenes(3, 2000, max_objects=4)]
    share = {L: letters.count(L) / len(letters) for L in "ABCD"}
    assert all(0.2 < s < 0.3 for s in share.values()), share
    sc, rng = scenes(4)[0]
    assert multiple_choice(sc, rng, num_options=2)[0]["value"].count("\nB. ") == 1
    with pytest.raises(ValueError, match="num_options=6"): multiple_choice(sc, rng, num_options=6)


def test_detail_names_every_object_and_true_relations():
    for sc, rng in scenes(5, 800):
        (q, a), = questions_and_answers(detail(sc, rng))
        assert caption_is_true(sc, a), a  # exactly the scene's objects, right cells, right count
        rels = re.findall(rf"the {TRIPLE} is ({RELS}) the {TRIPLE}", a)
        assert len(rels) == min(2, len(sc.objects) - 1)
        by = {triple(o): o for o in sc.objects}
        for *x, rel, y1, y2, y3 in (r for r in rels):
            assert REL[rel](by[tuple(x)], by[(y1, y2, y3)]), (rel, x, a)


def test_bad_arguments_name_the_value():
    sc, rng = scenes(6)[0]
    with pytest.raises(ValueError, match="form='count'"): reasoning(sc, rng, form="count")
    with pytest.raises(ValueError, match="turns=0"): conversation(sc, rng, turns=0)
    with pytest.raises(ValueError, match="turns=9"): short_answer(sc, rng, turns=9)


# ---------------------------------------------------------------- the dataset
def test_samples_are_deterministic_and_independent_of_the_batch():
    a, b = LlavaInstruct(seed=3), LlavaInstruct(seed=3)
    x, y = a.__getitems__([5, 1, 9]), [b[9], b[1], b[5]][::-1]
    for s, t in zip(x, y):
        assert s["id"] == t["id"] and s["conversations"] == t["conversations"] and s["meta"] == t["meta"]
        assert torch.equal(s["image"], t["image"])
    assert x[0]["id"] == "llava_instruct-3-train-5"
    other = [s["conversations"] for s in LlavaInstruct(seed=4).__getitems__(range(10))]
    assert other != [s["conversations"] for s in a.__getitems__(range(10))]
    test_split = [s["conversations"] for s in LlavaInstruct(seed=3, split="test").__getitems__(range(10))]
    assert test_split != [s["conversations"] for s in a.__getitems__(range(10))]


def test_image_is_the_scene_in_meta_and_schema_holds():
    ds = LlavaInstruct(seed=0, image_size=24)
    for s in ds.__getitems__(range(20)):
        assert set(s) == {"id", "image", "conversations", "meta"} and s["image"].shape == (3, 24, 24)
        assert s["meta"]["kind"] in INSTRUCT_KINDS
        from mmbridge_ref.data.shapesworld import render
        assert torch.equal(s["image"], render([scene_from_meta(s["meta"])], 24)[0])
        questions_and_answers(s["conversations"])
    batch = LlavaInstruct.collate(ds.__getitems__(range(4)))
    assert batch["image"].shape == (4, 3, 24, 24) and len(batch["conversations"]) == 4
    with pytest.raises(ValueError, match="empty batch"): LlavaInstruct.collate([])


def test_every_answer_in_the_dataset_is_checked_by_the_oracle():
    """All five kinds, through the dataset's own sampling: reasoning, short and multiple-choice answers are true."""
    ds = LlavaInstruct(seed=11, split="all", max_objects=6)
    for i in range(600):
        p = ds.plan(i); objs = scene_from_meta(p["meta"]).objects
        for q, a in questions_and_answers(p["conversations"]):
            kind = p["meta"]["kind"]
            if kind == "short_answer": assert a == oracle(q.rsplit("\n", 1)[0], objs)
            elif kind == "multiple_choice":
                q, *opts, _ = q.split("\n"); assert dict(o.split(". ", 1) for o in opts)[a] == oracle(q, objs)
            elif kind == "reasoning":
                tail = a.rsplit("so the answer is ", 1)[1].removesuffix(" .")
                assert (tail if tail in NUMBERS else set(re.findall(TRIPLE, tail))) == oracle(q, objs)


def test_kinds_follow_the_weights():
    ds = LlavaInstruct(seed=0)
    kinds = [ds.plan(i)["meta"]["kind"] for i in range(6000)]
    total = sum(LLAVA15_WEIGHTS.values())
    for k, w in LLAVA15_WEIGHTS.items():
        p = w / total
        assert abs(kinds.count(k) / len(kinds) - p) < 5 * (p * (1 - p) / len(kinds)) ** 0.5, k
    only = LlavaInstruct(weights={"detail": 1.0, "reasoning": 0})
    assert {only.plan(i)["meta"]["kind"] for i in range(100)} == {"detail"}


def test_the_train_split_never_names_a_held_out_pair():
    held = [f"{c} {s}" for c, s in HELD_OUT]
    ds = LlavaInstruct(seed=2, split="train")
    for i in range(3000):
        p = ds.plan(i)
        text = " ".join(t["value"] for t in p["conversations"])
        assert not any(h in text for h in held), text
        assert not any((o["colour"], o["shape"]) in HELD_OUT for o in p["meta"]["objects"])
    test = LlavaInstruct(seed=2, split="test")
    assert all(any((o["colour"], o["shape"]) in HELD_OUT for o in test.plan(i)["meta"]["objects"]) for i in range(300))


def test_dataset_errors_name_the_value():
    with pytest.raises(ValueError, match="split='val'"): LlavaInstruct(split="val")
    with pytest.raises(ValueError, match="kind='chat'"): LlavaInstruct(weights={"chat": 1.0})
    with pytest.raises(ValueError, match="'detail'"): LlavaInstruct(weights={"detail": -1.0})
    with pytest.raises(ValueError, match="max_objects=10"): LlavaInstruct(max_objects=10)
    with pytest.raises(IndexError, match="index 5"): LlavaInstruct(size=5)[5]
    with pytest.raises(TypeError): LlavaInstruct().plan(1.0)


# ---------------------------------------------------------------- LLaVA turns <-> chat messages
def test_conversations_to_messages_and_back():
    ds = LlavaInstruct(seed=1)
    for i in range(300):
        conv = ds.plan(i)["conversations"]
        msgs = conversations_to_messages(conv)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(conv) // 2)
        assert [m["content"] for m in msgs] == [t["value"] for t in conv]
        assert messages_to_conversations(msgs) == conv
    assert conversations_to_messages([{"from": "system", "value": "be brief"}]) == [{"role": "system", "content": "be brief"}]
    with pytest.raises(ValueError, match="turn 1: from='bot'"):
        conversations_to_messages([{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}])
    with pytest.raises(ValueError, match="role='model'"): messages_to_conversations([{"role": "model", "content": "x"}])


def test_generators_share_one_signature():
    sc, rng = scenes(8)[0]
    for kind, gen in GENERATORS.items():
        for split in ("train", "test", "all"):
            questions_and_answers(gen(sc, rng, split=split))
