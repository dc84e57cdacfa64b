"""sampling.py without a model: how a row advances and ends."""
from cit_backbone.sampling import RowState, Sampling, advance

EOS = 2


def detokenize(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def test_an_end_of_turn_token_ends_a_row_unless_it_ignores_eos():
    stops, ignores = RowState(), RowState()
    for state, params in ((stops, Sampling(max_new_tokens=3)), (ignores, Sampling(max_new_tokens=3, ignore_eos=True))):
        for token in (7, EOS, 9):
            if not state.finish_reason:
                advance(state, token, params, detokenize, {EOS})
    assert (stops.token_ids, stops.finish_reason) == ([7], "stop")
    assert (ignores.token_ids, ignores.finish_reason) == ([7, EOS, 9], "length")


def test_a_stop_string_ends_a_row_even_when_it_ignores_eos():
    state = RowState()
    for token in (1, 23, 4):
        if not state.finish_reason:
            advance(state, token, Sampling(max_new_tokens=8, stop=("23",), ignore_eos=True), detokenize, {EOS})
    assert (state.text, state.finish_reason) == ("1 ", "stop")
