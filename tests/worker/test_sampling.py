import torch

from exegpt.generation import SamplingParams
from services.worker.sampling import make_generator, sample_next_tokens


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert sample_next_tokens(logits, params, [None, None]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_top_p_limits_choices() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=3)
    draws = []
    for _ in range(2):
        generator = make_generator(params)
        draws.append([sample_next_tokens(logits, [params], [generator])[0] for _ in range(50)])
    assert draws[0] == draws[1]
    # top_p=0.7 keeps tokens 0 and 1 only (0.5 < 0.7 <= 0.8).
    assert set(draws[0]) <= {0, 1} and len(set(draws[0])) == 2


def test_high_temperature_spreads_choices() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=5.0, seed=1)
    generator = make_generator(params)
    seen = {sample_next_tokens(logits, [params], [generator])[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}
