"""Unit tests of the FairDRO weighting (scripts/fairdro.py): pure maths, bank, state, policies, hyperparameters."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from scripts.fairdro import (
    FairDRO,
    composite_weights,
    cvar_weights,
    effective_sample_size,
    ess_floor_mix,
    groupdro_update,
    intra_group_weights,
    oracle_weights,
    tilted_weights,
)

# ----------------------------------------------------------------------------------------------- cvar_weights


def test_cvar_fractional_boundary_case():
    # n = 7, alpha = 0.2 -> k = 1.4 cases: the worst (7.0, index 1) gets 1/1.4, the next (6.0, index 5) 0.4/1.4
    losses = torch.tensor([1.0, 7.0, 3.0, 5.0, 2.0, 6.0, 4.0], dtype=torch.float64)
    w = cvar_weights(losses, alpha=0.2)
    expected = torch.zeros(7, dtype=torch.float64)
    expected[1] = 1 / 1.4
    expected[5] = 0.4 / 1.4
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    # the weighted loss is the CVaR: (7 + 0.4 * 6) / 1.4
    assert math.isclose(float((w * losses).sum()), (7 + 0.4 * 6) / 1.4, rel_tol=1e-12)


def test_cvar_alpha_one_is_the_mean():
    losses = torch.tensor([0.3, 2.0, 1.1, 0.7])
    w = cvar_weights(losses, alpha=1.0)
    torch.testing.assert_close(w, torch.full((4,), 0.25))
    assert math.isclose(float((w * losses).sum()), float(losses.mean()), rel_tol=1e-6)


def test_cvar_small_tail_puts_all_mass_on_the_worst_case():
    # n = 3, alpha = 0.2 -> k = 0.6 < 1: the worst case takes everything
    w = cvar_weights(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), alpha=0.2)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_cvar_floor_mixes_in_uniform_weight():
    # n = 5, alpha = 0.4 -> k = 2: 1/2 on the two worst (9, 8); floor 0.1 -> 0.9 * q + 0.1 / 5
    losses = torch.tensor([9.0, 1.0, 8.0, 2.0, 3.0], dtype=torch.float64)
    w = cvar_weights(losses, alpha=0.4, floor=0.1)
    expected = torch.tensor([0.47, 0.02, 0.47, 0.02, 0.02], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)


def test_cvar_ties_share_weight_and_order_does_not_matter():
    # [5, 5, 1, 1], alpha = 0.25 -> k = 1: one unit of mass over the two tied worst cases -> 1/2 each
    w = cvar_weights(torch.tensor([1.0, 5.0, 1.0, 5.0], dtype=torch.float64), alpha=0.25)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(11, generator=gen, dtype=torch.float64)
    perm = torch.randperm(11, generator=gen)
    torch.testing.assert_close(cvar_weights(x, 0.3)[perm], cvar_weights(x[perm], 0.3))


def test_cvar_empty_group():
    assert cvar_weights(torch.zeros(0), 0.2).numel() == 0


# ---------------------------------------------------------------------------------------------- tilted_weights


def test_tilted_weights_by_hand_and_limits():
    # softmax([0, ln 3]) = [1/4, 3/4]
    w = tilted_weights(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64), tau=1.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    losses = torch.tensor([0.2, 1.5, 0.9, 0.4], dtype=torch.float64)
    # tau -> large: the group mean
    torch.testing.assert_close(tilted_weights(losses, tau=1e9), torch.full((4,), 0.25, dtype=torch.float64))
    # tau -> small: everything on the maximum (index 1)
    torch.testing.assert_close(
        tilted_weights(losses, tau=1e-4), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    )


def test_intra_none_is_uniform():
    torch.testing.assert_close(intra_group_weights(torch.tensor([3.0, 1.0, 2.0]), "none"), torch.full((3,), 1 / 3))


# ---------------------------------------------------------------------------------------------- groupdro_update


def test_groupdro_two_steps_by_hand():
    # pi0 = [1/2, 1/2], eta = 0.5. Step 1 with R = [1, 2]: pi ∝ [e^0.5, e^1] -> [1/(1+e^0.5), e^0.5/(1+e^0.5)]
    #                                                                         = [0.3775407, 0.6224593].
    # Step 2 with R = [3, 1]: pi ∝ pi0 * e^(0.5*(1+3)), pi0 * e^(0.5*(2+1)) = [e^2, e^1.5]
    #                                                                         -> [0.6224593, 0.3775407].
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    pi = groupdro_update(pi, torch.tensor([1.0, 2.0]), eta=0.5)
    e = math.exp(0.5)
    torch.testing.assert_close(pi, torch.tensor([1 / (1 + e), e / (1 + e)], dtype=torch.float64))
    pi = groupdro_update(pi, torch.tensor([3.0, 1.0]), eta=0.5)
    torch.testing.assert_close(pi, torch.tensor([e / (1 + e), 1 / (1 + e)], dtype=torch.float64))


def test_groupdro_inactive_groups_stay_zero_and_eta_zero_keeps_pi():
    pi = torch.tensor([0.2, 0.8, 0.0], dtype=torch.float64)
    new = groupdro_update(pi, torch.tensor([5.0, 1.0, 100.0]), eta=0.0)
    torch.testing.assert_close(new, pi)
    new = groupdro_update(pi, torch.tensor([1e6, 1.0, 1e6]), eta=1.0, active=torch.tensor([True, True, False]))
    assert not torch.isnan(new).any()
    torch.testing.assert_close(new, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- composite_weights


def test_composite_weights_sum_to_one_and_by_hand():
    # group 0: losses [4, 1] with cvar alpha 0.5 -> q = [1, 0]; group 1: [2, 2, 2] -> ties -> 1/3 each.
    # pi uniform = [1/2, 1/2]; case 5 (group -1) is outside DRO: 1/6; the five DRO cases share 5/6.
    values = torch.tensor([4.0, 1.0, 2.0, 2.0, 2.0, 9.0])
    groups = torch.tensor([0, 0, 1, 1, 1, -1])
    w = composite_weights(values, groups, torch.tensor([0.5, 0.5]), intra="cvar", alpha=0.5)
    m = 5 / 6
    expected = torch.tensor([m / 2, 0.0, m / 6, m / 6, m / 6, 1 / 6], dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    gen = torch.Generator().manual_seed(1)
    for intra in ("cvar", "tilted", "none"):
        v = torch.rand(20, generator=gen)
        g = torch.randint(-1, 4, (20,), generator=gen)
        pi = torch.rand(4, generator=gen)
        assert math.isclose(float(composite_weights(v, g, pi, intra=intra).sum()), 1.0, abs_tol=1e-12)


def test_composite_empty_group_gets_no_mass_and_no_nan():
    # pi puts mass on group 2, which has no case: renormalised over groups 0 and 1
    w = composite_weights(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.tensor([0.25, 0.25, 0.5]), "none")
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- FairDRO object


def _cohort(sizes, unknown=0):
    """(id, group) pairs: sizes[g] cases in group g, then `unknown` cases with group index len(sizes)."""
    pairs = [(f"g{g}c{i}", g) for g, n in enumerate(sizes) for i in range(n)]
    pairs += [(f"u{i}", len(sizes)) for i in range(unknown)]
    return pairs


def _fill(dro, value_of):
    ids = list(dro.ids)
    dro.update(ids, torch.tensor([value_of(c) for c in ids], dtype=torch.float64))


def test_bank_ema_by_hand():
    dro = FairDRO(2, _cohort([2, 1]), ema=0.25)
    # nothing seen yet: the first observation is taken as is
    dro.update(["g0c0"], torch.tensor([2.0]))
    assert float(dro.bank[0]) == 2.0 and dro.seen.tolist() == [True, False, False]
    # seen case: 0.75 * 2 + 0.25 * 4 = 2.5
    dro.update(["g0c0"], torch.tensor([4.0]))
    assert float(dro.bank[0]) == 2.5
    # unseen g0c1 starts from its group's running mean (2.5): 0.75 * 2.5 + 0.25 * 1 = 2.125
    # unseen g1c0 (group 1 has no seen case) starts from the mean of all seen cases (2.5): 0.75 * 2.5 + 0.25 * 7 = 3.625
    dro.update(["g0c1", "g1c0"], torch.tensor([1.0, 7.0]))
    torch.testing.assert_close(dro.bank, torch.tensor([2.5, 2.125, 3.625], dtype=torch.float64))
    assert dro.counts.tolist() == [2, 1, 1] and dro.num_updates == 3


def test_same_id_twice_in_a_batch_is_one_observation():
    dro = FairDRO(1, _cohort([2]), ema=0.25)
    dro.update(["g0c0", "g0c1"], torch.tensor([1.0, 1.0]))
    # two patches of g0c0 with losses 2 and 6 -> one observation 4 -> 0.75 * 1 + 0.25 * 4 = 1.75
    dro.update(["g0c0", "g0c0"], torch.tensor([2.0, 6.0]))
    assert float(dro.bank[0]) == 1.75
    assert dro.counts.tolist() == [2, 1]


def test_unseen_case_reads_its_group_mean():
    dro = FairDRO(2, _cohort([3, 1]), warmup_steps=0)
    dro.update(["g0c0", "g0c1"], torch.tensor([1.0, 3.0]))
    # g0c2 unseen -> group 0 mean 2; g1c0 unseen, group 1 empty of seen cases -> mean of all seen (2)
    torch.testing.assert_close(dro.filled_bank(), torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64))


def test_erm_configuration_is_the_plain_mean():
    dro = FairDRO(3, _cohort([4, 1, 2], unknown=1), intra="none", inter="empirical", warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    _fill(dro, lambda c: float(torch.rand(1, generator=gen)))
    torch.testing.assert_close(dro.case_weights(), torch.full((8,), 1 / 8, dtype=torch.float64))
    losses = torch.tensor([0.3, 1.7, 0.2], dtype=torch.float64, requires_grad=True)
    loss = dro.reduce(["g0c1", "g2c0", "u0"], losses)
    torch.testing.assert_close(loss, losses.mean(), rtol=1e-12, atol=0)


def test_loss_weights_normalisation_is_unbiased():
    # every batch of B = 2 out of N = 5 cases equally likely: E[(N/B) sum_batch w_i l_i] = sum_i w_i l_i
    dro = FairDRO(2, _cohort([3, 2]), alpha=0.5, warmup_steps=0)
    values = {"g0c0": 1.0, "g0c1": 4.0, "g0c2": 2.0, "g1c0": 3.0, "g1c1": 0.5}
    _fill(dro, values.get)
    w = dro.case_weights()
    target = float((w * dro.bank).sum())
    batches = list(itertools.combinations(dro.ids, 2))
    mean = sum(float(dro.reduce(list(b), torch.tensor([values[c] for c in b], dtype=torch.float64))) for b in batches)
    assert math.isclose(mean / len(batches), target, rel_tol=1e-12)
    # multipliers by hand for the batch (g0c1, g1c0): N w / B = 5/2 * w
    torch.testing.assert_close(dro.loss_weights(["g0c1", "g1c0"]), 2.5 * w[torch.tensor([1, 3])])


def test_apply_sample_reduces_to_the_mean():
    dro = FairDRO(1, _cohort([4]), apply="sample", warmup_steps=0)
    _fill(dro, lambda c: float(c[-1]))
    losses = torch.tensor([1.0, 5.0], dtype=torch.float64)
    assert float(dro.reduce(["g0c0", "g0c3"], losses)) == 3.0
    assert not torch.allclose(dro.case_weights(), torch.full((4,), 0.25, dtype=torch.float64))


def test_warmup_until_every_case_seen():
    dro = FairDRO(1, _cohort([3]), alpha=0.4)
    dro.update(["g0c0", "g0c1"], torch.tensor([5.0, 1.0]))
    assert dro.in_warmup
    torch.testing.assert_close(dro.case_weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
    losses = torch.tensor([5.0, 1.0], dtype=torch.float64)
    assert float(dro.reduce(["g0c0", "g0c1"], losses)) == 3.0  # exactly the batch mean
    dro.update(["g0c2"], torch.tensor([2.0]))
    assert not dro.in_warmup
    # alpha 0.4 of 3 cases -> k = 1.2: 1/1.2 on g0c0 (5), 0.2/1.2 on g0c2 (2), 0 on g0c1 (1)
    torch.testing.assert_close(dro.case_weights(), torch.tensor([1 / 1.2, 0.0, 0.2 / 1.2], dtype=torch.float64))


def test_warmup_steps_count():
    dro = FairDRO(1, _cohort([3]), warmup_steps=2)
    dro.update(["g0c0"], torch.tensor([5.0]))
    dro.update(["g0c0"], torch.tensor([5.0]))
    assert dro.in_warmup  # steps 1 and 2 use ERM weights
    dro.update(["g0c1"], torch.tensor([1.0]))
    assert not dro.in_warmup


def test_groupdro_pi_moves_towards_the_worse_group_after_warmup():
    dro = FairDRO(2, _cohort([2, 2]), intra="none", inter="groupdro", eta=0.5)
    dro.update(list(dro.ids), torch.tensor([1.0, 1.0, 3.0, 3.0]))
    # that update completed the bank; pi stepped once with R = [1, 3]: pi ∝ [e^0.5, e^1.5]
    e = math.exp(1.0)
    torch.testing.assert_close(dro.pi, torch.tensor([1 / (1 + e), e / (1 + e)], dtype=torch.float64))
    torch.testing.assert_close(dro.group_risks(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    w = dro.case_weights()
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.5 * e, 0.5 * e], dtype=torch.float64) / (1 + e))


def test_empty_group_never_produces_nan():
    for inter in ("uniform", "empirical", "groupdro"):
        dro = FairDRO(3, _cohort([2, 3]), inter=inter, warmup_steps=0)  # group 2 has no case
        _fill(dro, lambda c: float(len(c)))
        dro.update(["g0c0"], torch.tensor([2.0]))
        w = dro.case_weights()
        assert torch.isfinite(w).all() and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
        assert float(dro.current_pi()[2]) == 0.0
        assert all(math.isfinite(v) for v in dro.summary().values())
        assert "dro_pi_g2" not in dro.summary()


def test_unknown_subgroup_erm_policy():
    # 2 named groups (2 and 2 cases) and 2 unknown cases (index 2 = G): N = 6
    dro = FairDRO(2, _cohort([2, 2], unknown=2), alpha=0.5, warmup_steps=0)
    values = {"g0c0": 1.0, "g0c1": 2.0, "g1c0": 3.0, "g1c1": 4.0, "u0": 100.0, "u1": 0.0}
    _fill(dro, values.get)
    w = dro.case_weights()
    # unknown cases keep 1/6 each and do not enter any group; the named groups share 4/6, uniform pi -> 1/3 each,
    # cvar alpha 0.5 of 2 -> all of a group's mass on its worse case
    torch.testing.assert_close(w, torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 6, 1 / 6], dtype=torch.float64))
    assert dro.num_dro_groups == 2 and dro.group_risks().tolist() == [2.0, 4.0]
    assert dro.summary()["dro_mass_unknown"] == pytest.approx(1 / 3)


def test_unknown_subgroup_group_policy():
    dro = FairDRO(2, _cohort([2, 2], unknown=2), alpha=0.5, unknown="group", warmup_steps=0)
    values = {"g0c0": 1.0, "g0c1": 2.0, "g1c0": 3.0, "g1c1": 4.0, "u0": 100.0, "u1": 0.0}
    _fill(dro, values.get)
    # three groups with 1/3 each, all of a group's mass on its worse case (u0 for the unknown group)
    torch.testing.assert_close(dro.case_weights(), torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.float64) / 3)
    assert dro.num_dro_groups == 3 and dro.group_risks().tolist() == [2.0, 4.0, 100.0]


def test_cohort_from_datalist_items_with_names():
    items = [
        {"id": "a", "stage": "T1"},
        {"id": "b", "stage": "T2"},
        {"id": "c", "stage": "T9"},  # not in the list -> unknown
        {"id": "d"},  # missing -> unknown
        {"id": 5, "stage": 1},  # an index; id compared as a string
    ]
    dro = FairDRO(2, items, group_key="stage", group_names=["T1", "T2"])
    assert dro.ids == ["a", "b", "c", "d", "5"]
    assert dro.groups.tolist() == [0, 1, 2, 2, 1]
    assert dro.rows([5, "a"]).tolist() == [4, 0]
    with pytest.raises(ValueError, match="group_names"):
        FairDRO(2, items, group_key="stage")
    with pytest.raises(ValueError, match="unique"):
        FairDRO(2, [("a", 0), ("a", 1)])
    with pytest.raises(ValueError, match="empty"):
        FairDRO(2, [])


def test_update_rejects_bad_input():
    dro = FairDRO(2, _cohort([2, 1]))
    with pytest.raises(ValueError, match="'zz' is not in the FairDRO cohort"):
        dro.update(["zz"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="disagrees"):
        dro.update(["g0c0"], torch.tensor([1.0]), groups=torch.tensor([1]))
    with pytest.raises(ValueError, match="non-finite"):
        dro.update(["g0c0"], torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="2 losses for 1 case ids"):
        dro.update(["g0c0"], torch.tensor([1.0, 2.0]))
    assert dro.num_updates == 0 and not dro.seen.any()
    dro.update(["g0c0", "g1c0"], torch.tensor([1.0, 2.0]), groups=torch.tensor([0, 1]))  # consistent: accepted


def test_state_dict_round_trip_weights_only():
    cohort = _cohort([3, 2], unknown=1)
    dro = FairDRO(2, cohort, inter="groupdro", eta=0.3, warmup_steps=0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        ids = [dro.ids[int(i)] for i in torch.randint(0, 6, (2,), generator=gen)]
        dro.update(ids, torch.rand(2, generator=gen))
    buf = io.BytesIO()
    torch.save(dro.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # a fresh object over the same cohort in another order gets the same state per case id
    fresh = FairDRO(2, list(reversed(cohort)), inter="groupdro", eta=0.3, warmup_steps=0)
    fresh.load_state_dict(state)
    rows = fresh.rows(dro.ids)
    torch.testing.assert_close(fresh.bank[rows], dro.bank)
    assert torch.equal(fresh.seen[rows], dro.seen) and torch.equal(fresh.counts[rows], dro.counts)
    torch.testing.assert_close(fresh.pi, dro.pi)
    assert fresh.num_updates == dro.num_updates == 4
    torch.testing.assert_close(fresh.case_weights()[rows], dro.case_weights())
    # both continue identically
    dro.update(["g0c1"], torch.tensor([0.9]))
    fresh.update(["g0c1"], torch.tensor([0.9]))
    torch.testing.assert_close(fresh.pi, dro.pi)
    with pytest.raises(ValueError, match="another cohort"):
        FairDRO(2, _cohort([3, 3])).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"eta": -0.1}, "eta"),
        ({"ema": 0.0}, "ema"),
        ({"ema": 1.01}, "ema"),
        ({"floor": -0.1}, "floor"),
        ({"floor": 1.5}, "floor"),
        ({"intra": "worst"}, "intra"),
        ({"inter": "minimax"}, "inter"),
        ({"apply": "both"}, "apply"),
        ({"unknown": "drop"}, "unknown"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"num_groups": 0}, "num_groups"),
        ({"group_names": ["a"]}, "group_names"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    args = {"num_groups": 2, "cohort": _cohort([1, 1])}
    args.update(kwargs)
    value = repr(next(iter(kwargs.values())))
    with pytest.raises(ValueError, match=name) as info:
        FairDRO(**args)
    assert value in str(info.value)


def test_pure_functions_validate_arguments():
    with pytest.raises(ValueError, match="alpha"):
        cvar_weights([1.0], alpha=2.0)
    with pytest.raises(ValueError, match="tau"):
        tilted_weights([1.0], tau=0.0)
    with pytest.raises(ValueError, match="eta"):
        groupdro_update(torch.ones(2) / 2, torch.ones(2), eta=-1.0)
    with pytest.raises(ValueError, match="intra"):
        intra_group_weights([1.0], intra="max")


def test_behaviour_weights_concentrate_on_planted_hard_cases():
    # group 0: 40 cases, 8 planted hard ones (loss ~3) among easy ones (loss ~0.5); group 1: 20 easy cases.
    # FairDRO with its defaults (cvar, alpha 0.2 -> the worst 8 of group 0) vs ERM.
    gen = torch.Generator().manual_seed(0)
    cohort = _cohort([40, 20])
    planted = {f"g0c{i}" for i in (3, 7, 11, 15, 19, 23, 27, 31)}
    fair = FairDRO(2, cohort)
    erm = FairDRO(2, cohort, intra="none", inter="empirical")
    for _ in range(3):  # a few noisy epochs of per-case losses, in batches of 2
        order = torch.randperm(60, generator=gen).tolist()
        for j in range(0, 60, 2):
            ids = [cohort[k][0] for k in order[j : j + 2]]
            base = torch.tensor([3.0 if c in planted else 0.5 for c in ids], dtype=torch.float64)
            losses = base + 0.1 * torch.rand(2, generator=gen, dtype=torch.float64)
            fair.update(ids, losses)
            erm.update(ids, losses)
    w = fair.case_weights()
    g0 = fair.groups == 0
    is_planted = torch.tensor([c in planted for c in fair.ids])
    share = float(w[g0 & is_planted].sum() / w[g0].sum())
    assert share > 0.8, share
    torch.testing.assert_close(erm.case_weights(), torch.full((60,), 1 / 60, dtype=torch.float64))
    # ERM gives the planted cases only their head count: 8 / 40 of group 0's mass
    we = erm.case_weights()
    assert float(we[g0 & is_planted].sum() / we[g0].sum()) == pytest.approx(0.2)


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dro = FairDRO(2, _cohort([2, 2]), ema=1.0, warmup_steps=0)
        ids = ["g0c0", "g1c0"] if rank == 0 else ["g0c1", "g1c1"]
        dro.update(ids, torch.tensor([1.0, 2.0]) + 10 * rank)
        torch.save(dro.state_dict(), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_update_gives_every_rank_the_same_bank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2, join=True)
    s0 = torch.load(f"{tmp_path / 'state'}.0", weights_only=True)
    s1 = torch.load(f"{tmp_path / 'state'}.1", weights_only=True)
    # both ranks saw all four cases: [g0c0, g0c1, g1c0, g1c1] = [1, 11, 2, 12]
    expected = torch.tensor([1.0, 11.0, 2.0, 12.0], dtype=torch.float64)
    torch.testing.assert_close(s0["bank"], expected)
    torch.testing.assert_close(s1["bank"], expected)
    assert s0["num_updates"] == s1["num_updates"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# oracle (intra="oracle"): minority and majority of each group carry equal total weight
# ----------------------------------------------------------------------------------------------------------------------
def _oracle_cohort():
    # stage T1: 8 cases, 2 necrotic; T2: 5 cases, 1 necrotic; T3: 3 cases, none; T4: 4 cases, 1 distractor
    spec = {"T1": (8, 2), "T2": (5, 1), "T3": (3, 0), "T4": (4, 1)}
    items = []
    for stage, (n, n_min) in spec.items():
        for k in range(n):
            subtype = ("necrotic" if stage != "T4" else "distractor") if k < n_min else "majority"
            items.append({"id": f"{stage}_{k}", "stage": stage, "subtype": subtype})
    return items


def test_oracle_weights_by_hand():
    # 2 minority of 8: minority 1/(2*2) = 0.25 each, majority 1/(2*6) = 1/12 each
    w = oracle_weights([True, True, False, False, False, False, False, False])
    assert torch.allclose(w, torch.tensor([0.25, 0.25] + [1 / 12] * 6, dtype=torch.float64))
    # one subtype only: uniform
    assert torch.allclose(oracle_weights([False] * 3), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert oracle_weights([]).numel() == 0


def test_oracle_gives_minority_and_majority_equal_weight_in_every_stage_group():
    items = _oracle_cohort()
    dro = FairDRO(4, items, intra="oracle", inter="empirical", group_names=["T1", "T2", "T3", "T4"],
                  group_key="stage", subtype_key="subtype", apply="sample")  # fmt: skip
    assert not dro.in_warmup  # weights do not depend on the bank: no ERM warm-up
    w = dro.case_weights()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    n = len(items)
    for stage in ("T1", "T2", "T3", "T4"):
        rows = [i for i, it in enumerate(items) if it["stage"] == stage]
        mino = [i for i in rows if items[i]["subtype"] != "majority"]
        majo = [i for i in rows if items[i]["subtype"] == "majority"]
        # the stage group keeps its empirical mass n_g / N (as in ERM)
        assert math.isclose(float(w[rows].sum()), len(rows) / n, rel_tol=1e-12)
        if mino:
            assert math.isclose(float(w[mino].sum()), float(w[majo].sum()), rel_tol=1e-12)
        else:  # T3 has no minority: uniform inside the group
            assert torch.allclose(w[rows], torch.full((len(rows),), 1 / n, dtype=torch.float64))
    # by hand, T1: mass 8/20 split 0.2 / 0.2: minority 0.1 each, majority 0.2/6 each
    assert math.isclose(float(w[0]), 0.1, rel_tol=1e-12) and math.isclose(float(w[2]), 0.2 / 6, rel_tol=1e-12)
    # the bank does not move the oracle weights
    dro.update([it["id"] for it in items[:4]], torch.tensor([5.0, 0.1, 0.2, 0.3]))
    assert torch.equal(dro.case_weights(), w)


def test_oracle_needs_the_subtype():
    items = _oracle_cohort()
    with pytest.raises(ValueError, match="subtype_key"):
        FairDRO(4, items, intra="oracle", group_names=["T1", "T2", "T3", "T4"], group_key="stage")
    del items[3]["subtype"]
    with pytest.raises(ValueError, match="lack it"):
        FairDRO(4, items, intra="oracle", group_names=["T1", "T2", "T3", "T4"], group_key="stage",
                subtype_key="subtype")  # fmt: skip
    # other modes never read it
    assert FairDRO(4, items, intra="cvar", group_names=["T1", "T2", "T3", "T4"], group_key="stage").minority is None


# ----------------------------------------------------------------------------------------------------------------------
# ESS floor (min_ess), warm-up by epochs, refresh mode
# ----------------------------------------------------------------------------------------------------------------------
def _grid_lam(w_dro, w_uni, target, lam_min):
    """Smallest lam on a fine grid reaching the ESS target (independent of the bisection)."""
    for lam in torch.linspace(lam_min, 1.0, 20001, dtype=torch.float64).tolist():
        w = (1 - lam) * w_dro + lam * w_uni
        if float(w.sum()) ** 2 / float((w * w).sum()) >= target:
            return lam
    return 1.0


@pytest.mark.parametrize("case", ["random", "all_equal", "one_outlier", "empty_group"])
@pytest.mark.parametrize("min_ess", [0.3, 0.5, 0.8, 0.99])
def test_ess_floor_holds_and_weights_sum_to_one(case, min_ess):
    gen = torch.Generator().manual_seed(hash((case, min_ess)) % 2**31)
    sizes = [7, 5, 0, 3] if case == "empty_group" else [7, 5, 4, 3]
    items = [{"id": f"c{g}_{k}", "subgroup": g} for g, n in enumerate(sizes) for k in range(n)]
    n = len(items)
    if case == "all_equal":
        losses = torch.full((n,), 0.7, dtype=torch.float64)
    else:
        losses = torch.rand(n, generator=gen, dtype=torch.float64)
        if case == "one_outlier":
            losses[3] = 50.0
    dro = FairDRO(4, items, intra="cvar", alpha=0.2, floor=0.0, min_ess=min_ess, warmup_epochs=0)
    dro.update([it["id"] for it in items], losses)
    w = dro.case_weights()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-9)
    assert bool((w >= 0).all())
    ess = effective_sample_size(w)
    groups = torch.tensor([it["subgroup"] for it in items])
    w_dro = composite_weights(dro.filled_bank(), groups, dro.current_pi(), "cvar", 0.2, 1.0, 0.0)
    w_uni = composite_weights(dro.filled_bank(), groups, dro.current_pi(), "none")
    reachable = effective_sample_size(w_uni) >= min_ess * n
    if reachable:
        assert ess >= min_ess * n - 1e-6
        # the smallest such lam: a fine grid search agrees with the bisection
        assert abs(dro.last_lam - _grid_lam(w_dro, w_uni, min_ess * n, 0.0)) <= 1e-4
    else:  # uniform intra weights under uniform pi cannot reach it: lam = 1, the most even weights there are
        assert dro.last_lam == 1.0 and torch.allclose(w, w_uni)


def test_ess_floor_by_hand_and_floor_is_a_lower_bound():
    # one group of 4, CVaR alpha 0.25: all mass on the worst case -> ESS 1; uniform -> ESS 4.
    # w(lam) = (1-lam) e_worst + lam/4: ESS = 1 / ((1 - 3 lam / 4)^2 + 3 (lam / 4)^2); ESS = 2 (min_ess 0.5) where
    # (1 - 0.75 l)^2 + 0.1875 l^2 = 0.5 -> 0.75 l^2 - 1.5 l + 0.5 = 0 -> l = 1 - sqrt(1/3) = 0.42265
    w_dro = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    w_uni = torch.full((4,), 0.25, dtype=torch.float64)
    w, lam = ess_floor_mix(w_dro, w_uni, 0.5)
    assert abs(lam - (1 - math.sqrt(1 / 3))) < 1e-9
    assert abs(effective_sample_size(w) - 2.0) < 1e-6
    # a floor above that lam wins
    _, lam = ess_floor_mix(w_dro, w_uni, 0.5, lam_min=0.6)
    assert lam == 0.6
    with pytest.raises(ValueError, match="min_ess"):
        ess_floor_mix(w_dro, w_uni, 1.5)


def test_warmup_epochs_and_refresh_mode():
    items = [{"id": f"c{k}", "subgroup": k % 2} for k in range(6)]
    dro = FairDRO(2, items, alpha=0.5, warmup_epochs=2, refresh_every=1)
    ids = [it["id"] for it in items]
    dro.update(ids, torch.arange(6, dtype=torch.float64))
    assert dro.in_warmup and not bool(dro.seen.any()), "in refresh mode training losses never enter the bank"
    dro.epoch_completed(1)
    assert dro.in_warmup and not dro.refresh_due()
    dro.epoch_completed(2)
    assert dro.refresh_due() and dro.in_warmup  # warm-up ends with the first refresh
    dro.refresh(ids, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    assert not dro.in_warmup and torch.equal(
        dro.bank, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    )
    # the weights are an explicit recomputation from the refreshed losses: CVaR 0.5 per group of 3, pi uniform
    expected = torch.zeros(6, dtype=torch.float64)
    for g in (0, 1):
        rows = [k for k in range(6) if k % 2 == g]
        expected[rows] = 0.5 * cvar_weights(dro.bank[rows], alpha=0.5)
    assert torch.allclose(dro.case_weights(), expected)
    state = dro.state_dict()
    again = FairDRO(2, items, alpha=0.5, warmup_epochs=2, refresh_every=1)
    again.load_state_dict(state)
    assert again.epochs_completed == 2 and again.num_refreshes == 1 and torch.equal(again.case_weights(), expected)


def test_warmup_steps_still_works_and_warns(caplog):
    items = [{"id": f"c{k}", "subgroup": 0} for k in range(3)]
    with pytest.warns(DeprecationWarning, match="warmup_epochs"):
        dro = FairDRO(1, items, warmup_steps=1)
    ids = [it["id"] for it in items]
    dro.update(ids, torch.tensor([1.0, 2.0, 3.0]))
    assert dro.in_warmup  # step 1 of 1
    dro.update(ids, torch.tensor([1.0, 2.0, 3.0]))
    assert not dro.in_warmup
    assert "deprecated" in caplog.text
