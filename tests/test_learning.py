"""The planted-concept model (scripts/make_tiny_model.py --layout planted): the prompt matters.

scripts/bench_learning.py plants a concept in that model and measures how much of it a run
recovers; it needs the model's noise prediction to depend on the prompt, which a random tiny
model's hardly does. The learning measurement itself is not a test: on this random-weight model
the planted row's held-out loss is not clearly below the initializer's (see the README's
Benchmark section), so "closes half of the gap" would not mean anything.
"""

import make_tiny_model
from bench_learning import prompt_share


def test_planted_model_prompt_moves_the_prediction(tiny_model_dir, tmp_path):
    # Fails if the cross-attention gains stop reaching the UNet's weights (a renamed key, a
    # build that forgets them): the planted model's share then falls to the tiny model's.
    planted = make_tiny_model.build_tiny_model(str(tmp_path / "planted"), layout="planted", seed=0)
    tiny_share, planted_share = prompt_share(tiny_model_dir), prompt_share(planted)
    assert tiny_share < 0.01
    assert planted_share > 0.1
