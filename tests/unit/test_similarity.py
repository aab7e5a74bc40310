"""Similarity task bodies against a naive reference: per layer, the cosine of the models'
concatenated flattened weights (and task vectors)."""

import torch
from safetensors.torch import save_file

from workers.io.index import index_checkpoint
from workers.io.storage import LocalStore
from workers.similarity import LayerGroup, SimilarityContext, layer_cosines


def _model(folder, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {"a.weight": torch.randn(4, 6, generator=gen), "b.bias": torch.randn(5, generator=gen)}
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return state


def test_layer_cosines_match_a_naive_reference(tmp_path):
    """Symmetric, 1 on the diagonal, equal to the cosine of the concatenated vectors; a copy of
    a model has cosine 1 with it; task vectors are taken against the base."""
    states = [_model(tmp_path / f"m{i}", seed) for i, seed in enumerate((0, 1, 0))]  # m2 = m0
    base = _model(tmp_path / "base", 7)
    stores = [LocalStore(str(tmp_path / n)) for n in ("m0", "m1", "m2", "base")]
    indexes = [index_checkpoint(n, st) for n, st in zip("abcz", stores)]
    names = sorted(states[0])
    group = LayerGroup("other", tuple((n, tuple(i.tensors[n] for i in indexes)) for n in names), 0)
    found = layer_cosines(group, SimilarityContext(tuple(stores), 3, 1))

    def naive(vectors):
        return [[float(torch.nn.functional.cosine_similarity(u, v, dim=0)) for v in vectors]
                for u in vectors]

    flat = [torch.cat([s[n].double().reshape(-1) for n in names]) for s in states]
    flat_base = torch.cat([base[n].double().reshape(-1) for n in names])
    for metric, vectors in (("weights_cosine", flat),
                            ("task_vectors_cosine", [f - flat_base for f in flat])):
        m = torch.tensor(found[metric])
        torch.testing.assert_close(m, torch.tensor(naive(vectors), dtype=m.dtype))
        torch.testing.assert_close(m, m.T)
        assert abs(m[0, 2] - 1) < 1e-12
