"""scripts/toy_world.py's wall-clock plan: the decoder and the generator get what the data and the toy CLIP leave."""
import pytest

from scripts.toy_world import GENERATOR_LEAD_MIN, RESERVE_S, stage_minutes


def test_stage_minutes_fill_the_budget_left_after_the_clip():
    dec, gen = stage_minutes(14.0, elapsed_s=60.0, parallel=True, dec_ov=[], gen_ov=["train.max_steps=5"])
    assert dec == pytest.approx((14 * 60 - 60 - RESERVE_S) / 60) and gen == pytest.approx(dec - GENERATOR_LEAD_MIN)
    slow, _ = stage_minutes(14.0, elapsed_s=140.0, parallel=True, dec_ov=[], gen_ov=[])
    assert slow == pytest.approx(dec - 80 / 60)  # a slower CLIP stage leaves the later stages less


def test_stage_minutes_step_aside():
    assert stage_minutes(0, 60.0, True, [], []) == (None, None)  # budget off: the configs' max_minutes
    assert stage_minutes(14.0, 60.0, False, [], []) == (None, None)  # --sequential
    assert stage_minutes(14.0, 60.0, True, [], ["train.max_minutes=3"]) == (None, None)  # the user's own minutes
    with pytest.raises(SystemExit, match="leaves no time to train"):
        stage_minutes(3.0, elapsed_s=150.0, parallel=True, dec_ov=[], gen_ov=[])
