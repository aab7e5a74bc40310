from orchestrator.planning.vocab import RowMap, Vocabulary, row_maps


def vocab(sources, rows=None):
    tokens = len(next(iter(sources.values())))
    return Vocabulary({}, rows or tokens, tokens, sources, {m: 10 for m in sources})


def test_rows_follow_mergekits_rules_for_missing_tokens():
    """Token 0: everyone has it (own rows). Token 1: only input 1 has it (its row for all).
    Token 2: nobody (zeros). Token 3: inputs 0 and 2 (the base, input 2, gives its row).
    Token 4: inputs 0 and 1 without the base: their mean."""
    v = vocab({0: [0, -1, -1, 5, 7], 1: [1, 2, -1, -1, 8], 2: [2, -1, -1, 6, -1]})
    a, b, base = row_maps(v, [0, 1, 2], base=2)
    assert a == RowMap(5, 5, ((0, 0, 1), (3, 5, 1), (4, 7, 1)), ((1, ((1, 2),)), (2, ())))
    assert b.runs == ((0, 1, 2), (4, 8, 1))
    assert b.borrowed == ((2, ()), (3, ((2, 6),)))
    assert base.borrowed == ((1, ((1, 2),)), (2, ()), (4, ((0, 7), (1, 8))))


def test_padding_is_recorded_and_runs_coalesce():
    v = vocab({0: [3, 4, 5, 0], 1: [0, 1, 2, 3]}, rows=8)
    a, b = row_maps(v, [0, 1], base=None)
    assert a.runs == ((0, 3, 3), (3, 0, 1)) and b.runs == ((0, 0, 4),)
    assert a.rows == 8 and a.tokens == 4 and not a.borrowed
