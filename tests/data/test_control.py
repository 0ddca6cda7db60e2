import pytest
import torch

from distill_pl.data.control import canny_control


def step_video(step_col: int = 10, size: int = 20, frames: int = 2) -> torch.Tensor:
    """[3, T, H, W]: black (-1) left of ``step_col``, white (+1) from it on."""
    video = -torch.ones(3, frames, size, size)
    video[..., step_col:] = 1
    return video


def test_vertical_step_gives_one_edge_column():
    control = canny_control(step_video(step_col=10))
    assert control.shape == (3, 2, 20, 20)
    assert set(control.unique().tolist()) == {-1.0, 1.0}
    edges = control > 0
    columns = edges.nonzero()[:, -1].unique().tolist()
    assert len(columns) == 1 and columns[0] in (9, 10)  # the pixel on either side of the step
    assert edges[..., columns[0]].all()  # the whole column, every frame and channel
    assert torch.equal(control[0], control[1]) and torch.equal(control[0], control[2])


def test_batched_equals_unbatched_and_flat_video_has_no_edges():
    video = step_video(step_col=7)
    assert torch.equal(canny_control(video[None])[0], canny_control(video))
    flat = canny_control(torch.zeros(2, 3, 3, 16, 16))
    assert (flat == -1).all()


def test_horizontal_step_is_a_row():
    video = step_video().transpose(-1, -2).contiguous()
    rows = (canny_control(video) > 0).nonzero()[:, -2].unique().tolist()
    assert len(rows) == 1 and rows[0] in (9, 10)


def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match="3, T, H, W"):
        canny_control(torch.zeros(1, 4, 16, 16))


def test_canny_in_chunks_equals_all_frames_at_once(monkeypatch):
    from distill_pl.data import control

    video = torch.rand(3, 5, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = canny_control(video)
    monkeypatch.setattr(control, "CANNY_CHUNK_BYTES", 24 * 24 * 4 * 64 * 2)  # 2 frames per chunk
    assert torch.equal(canny_control(video), whole)
