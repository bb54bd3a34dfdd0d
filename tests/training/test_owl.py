"""OWL layer allocation: the pure functions by hand, and ``prune(allocation="owl")`` giving each block the
sparsity its outlier ratio (from a plain forward pass, by hand) calls for, the global sparsity staying the
target."""

import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
from sparseinfer import training as T  # noqa: E402
from sparseinfer.training.pruning import outlier_ratio, owl_allocation, owl_sparsities  # noqa: E402
from sparseinfer.training.pruning.calibrate import block_groups  # noqa: E402


def test_outlier_ratio_by_hand():
    # Mean 10.9, so with m=5 only the 100 is above 54.5: one outlier in ten entries, across both matrices.
    scores = [torch.ones(3, 3), torch.tensor([[100.0]])]
    assert outlier_ratio(scores, m=5) == pytest.approx(0.1)
    assert outlier_ratio(scores, m=10) == pytest.approx(0.0)  # 100 < 10 × 10.9
    assert outlier_ratio([torch.ones(4, 4)], m=0.5) == 1.0
    with pytest.raises(ValueError):
        outlier_ratio(scores, m=0)


def test_owl_sparsities():
    ratios = [0.02, 0.10, 0.05, 0.01]
    s = owl_sparsities(ratios, 0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7, abs=1e-12)
    # More outliers, less sparsity; the spread is 2λ between the fewest and the most outliers.
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])
    assert max(s) - min(s) == pytest.approx(0.16)
    # s_l = target − 2λ (r̂_l − mean r̂), r̂ = (r − 0.01) / 0.09.
    scaled = [(r - 0.01) / 0.09 for r in ratios]
    for sl, rl in zip(s, scaled):
        assert sl == pytest.approx(0.7 - 0.16 * (rl - sum(scaled) / 4))
    # Weighted by block size, the weighted mean (the global sparsity) is the target.
    sizes = [1, 3, 2, 2]
    sw = owl_sparsities(ratios, 0.7, lam=0.08, sizes=sizes)
    assert sum(x * n for x, n in zip(sw, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert owl_sparsities([0.3, 0.3], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="out of"):
        owl_sparsities(ratios, 0.95, lam=0.2)


def test_prune_with_owl_allocation(tmp_path):
    model = tiny_models.build("llama", tmp_path, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, tiny_models.VOCAB, (2, 24), generator=g)} for _ in range(2)]
    modules = T.prunable_linears(model)
    groups = block_groups(model, modules)
    # By hand: each linear's input norms from a plain forward pass, Wanda scores, one outlier ratio per block.
    sq = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: sq.__setitem__(n, sq.get(n, 0) + (a[0] ** 2).sum((0, 1))))
        for n, m in modules.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    ratios = [outlier_ratio([modules[n].weight.detach().abs() * sq[n].sqrt() for n in names], m=5) for names in groups]
    want = owl_sparsities(ratios, 0.6, lam=0.08)
    alloc = owl_allocation(model, batches, modules, 0.6, lam=0.08, m=5)
    for i, names in enumerate(groups):
        for n in names:  # one sparsity per block
            assert alloc[n] == pytest.approx(want[i], abs=1e-6), (n, alloc[n], want[i])
    assert max(want) - min(want) == pytest.approx(0.16) and sum(want) / 4 == pytest.approx(0.6, abs=1e-12)
    assert ratios.index(max(ratios)) == want.index(min(want))  # the most outliers, the least sparsity
    masks = T.prune(model, "wanda", 0.6, calibration=batches, allocation="owl", owl_lambda=0.08, owl_m=5)
    report = T.sparsity_report(model, masks)
    for i, names in enumerate(groups):
        for n in names:  # Wanda rounds the count down per row of 64 or 128 inputs
            assert want[i] - 1 / 64 <= report[n] <= want[i] + 1e-6, (n, report[n], want[i])
    assert abs(report["global"] - 0.6) < 1 / 64
    with pytest.raises(ValueError, match="calibration"):
        T.prune(model, "magnitude", 0.5, allocation="owl")
    with pytest.raises(ValueError, match="allocation"):
        T.prune(model, "magnitude", 0.5, allocation="lumpy")
