import pytest

from splitft.config import TrainConfig
from splitft.split.optim import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_schedule(schedule):
    cfg = TrainConfig(lr=1.0, warmup_steps=3, schedule=schedule)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == sorted(lrs[:4]) and lrs[0] > 0  # warm-up rises, never 0
    assert max(lrs) <= 1.0
    if schedule == "constant":
        assert lrs[3:] == [1.0] * 17
    else:
        assert lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[-1] < 0.1
