"""Perceiver Resampler: fixed output count, invariances, masks, clips, bad input, parity with flamingo-pytorch."""
import pytest
import torch
from einops import rearrange

from mmbridge_ref.bridges.resampler import PerceiverResampler, load_flamingo_pytorch

DIM = 32


@pytest.fixture
def resampler():
    torch.manual_seed(0)
    return PerceiverResampler(DIM, depth=2, num_latents=16, heads=4, dim_head=8, max_frames=4)


@pytest.mark.parametrize("shape", [(2, 16), (2, 64), (2, 256), (3, 1, 7), (1, 4, 20)])
def test_output_count_is_fixed(resampler, shape):
    assert resampler(torch.randn(*shape, DIM)).shape == (shape[0], 16, DIM)


def test_order_of_a_frames_tokens_does_not_matter(resampler):
    img, clip = torch.randn(2, 20, DIM), torch.randn(2, 3, 20, DIM)
    torch.testing.assert_close(resampler(img[:, torch.randperm(20)]), resampler(img), atol=1e-5, rtol=1e-5)
    shuffled = clip.clone()
    shuffled[:, 1] = clip[:, 1, torch.randperm(20)]  # one frame's tokens, inside a clip
    torch.testing.assert_close(resampler(shuffled), resampler(clip), atol=1e-5, rtol=1e-5)


def test_padded_tokens_under_the_mask_change_nothing(resampler):
    img = torch.randn(3, 20, DIM)
    lengths = torch.tensor([20, 13, 1])
    padded = 1e6 * torch.randn(3, 30, DIM)  # huge noise everywhere, real tokens copied in below
    mask = torch.arange(30) < lengths[:, None]
    for i, n in enumerate(lengths.tolist()): padded[i, :n] = img[i, :n]
    out = resampler(padded, mask)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i], resampler(img[i:i + 1, :n])[0], atol=1e-4, rtol=1e-4)
    # the check has teeth: without the mask the noise dominates
    assert (resampler(padded)[1] - out[1]).abs().max() > 1e-2


def test_padded_frames_and_tokens_of_a_clip_change_nothing(resampler):
    clip = torch.randn(2, 2, 10, DIM)
    padded = 1e6 * torch.randn(2, 3, 12, DIM)  # one extra frame, two extra tokens per frame
    padded[:, :2, :10] = clip
    mask = torch.zeros(2, 3, 12, dtype=torch.bool)
    mask[:, :2, :10] = True
    torch.testing.assert_close(resampler(padded, mask), resampler(clip), atol=1e-4, rtol=1e-4)


def test_an_image_is_a_one_frame_clip_and_frame_order_matters(resampler):
    img, clip = torch.randn(2, 20, DIM), torch.randn(2, 3, 20, DIM)
    torch.testing.assert_close(resampler(img), resampler(img[:, None]))
    assert (resampler(clip) - resampler(clip.flip(1))).abs().max() > 1e-3  # time embeddings tell frames apart


def test_every_parameter_gets_a_gradient(resampler):
    resampler(torch.randn(2, 3, 20, DIM)).square().sum().backward()
    no_grad = [n for n, p in resampler.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


@pytest.mark.parametrize("make, match", [
    (lambda: torch.randn(2, 5, 20, DIM), "f=5 frames but max_frames=4"),
    (lambda: torch.randn(2, 20, DIM + 1), f"dim={DIM}"),
    (lambda: torch.randn(20, DIM), r"\(20, 32\)"),
    (lambda: torch.randn(1, 1, 2, 20, DIM), r"\(1, 1, 2, 20, 32\)"),
])
def test_bad_input_names_the_value(resampler, make, match):
    with pytest.raises(ValueError, match=match): resampler(make())


def test_bad_mask_names_the_value(resampler):
    img = torch.randn(2, 20, DIM)
    with pytest.raises(ValueError, match=r"\(2, 19\)"): resampler(img, torch.ones(2, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype=torch.int64"): resampler(img, torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="depth=0"): PerceiverResampler(DIM, depth=0)


def _pair(max_frames=4):
    from flamingo_pytorch import PerceiverResampler as Theirs
    torch.manual_seed(1)
    theirs = Theirs(dim=DIM, depth=2, dim_head=8, heads=4, num_latents=16, num_media_embeds=max_frames)
    ours = PerceiverResampler(DIM, depth=2, num_latents=16, heads=4, dim_head=8, max_frames=max_frames)
    return load_flamingo_pytorch(ours, theirs), theirs


def test_matches_flamingo_pytorch_on_an_image():
    ours, theirs = _pair()
    img = torch.randn(3, 25, DIM)
    torch.testing.assert_close(ours(img), theirs(img)[:, 0], atol=1e-5, rtol=1e-5)


def test_matches_flamingo_pytorch_on_a_clip_flattened_the_papers_way():
    """flamingo-pytorch resamples each frame separately; feeding it our time-embedded, flattened clip as one frame
    (with its own time embedding zeroed) must give our output."""
    ours, theirs = _pair()
    clip = torch.randn(2, 3, 10, DIM)
    flat = rearrange(clip + ours.time_emb[:3, None], "b f n d -> b 1 (f n) d")
    per_frame = theirs(clip)
    with torch.no_grad(): theirs.media_pos_emb.zero_()
    torch.testing.assert_close(ours(clip), theirs(flat)[:, 0], atol=1e-5, rtol=1e-5)
    assert per_frame.shape == (2, 3, 16, DIM)  # theirs: one set of latents per frame, ours: one per clip


def test_loading_weights_of_other_sizes_is_refused():
    from flamingo_pytorch import PerceiverResampler as Theirs
    theirs = Theirs(dim=DIM, depth=2, dim_head=8, heads=4, num_latents=16, num_media_embeds=4)
    with pytest.raises(ValueError, match="time_emb"):
        load_flamingo_pytorch(PerceiverResampler(DIM, depth=2, num_latents=16, heads=4, dim_head=8, max_frames=8), theirs)
