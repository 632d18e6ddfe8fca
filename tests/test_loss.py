"""nce_loss, estimate_z, info_nce_loss against slow loops from the formulas; PIRLCriterion end to end.

Bound: the fp32 losses agree with the float64 loops to a relative 1e-5.
"""

import math

import pytest
import torch

from pirl_fast.model.loss import LossConfig, PIRLCriterion, estimate_z, info_nce_loss, nce_loss
from pirl_fast.model.memory_bank import BankConfig, MemoryBank


def scores(b, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, generator=gen) * 2 - 1, torch.rand(b, k, generator=gen) * 2 - 1  # cosines


def nce_loop(pos, neg, tau, n_data, z):
    c = neg.shape[1] / n_data
    total = 0.0
    for b in range(len(pos)):
        p0 = math.exp(pos[b].item() / tau) / z
        term = math.log(p0 / (p0 + c))
        for s in neg[b].tolist():
            pk = math.exp(s / tau) / z
            term += math.log(c / (pk + c))
        total -= term
    return total / len(pos)


def z_loop(pos, neg, tau, n_data):
    values = [math.exp(s / tau) for s in pos.tolist() + neg.flatten().tolist()]
    return sum(values) / len(values) * n_data


def infonce_loop(pos, neg, tau):
    total = 0.0
    for b in range(len(pos)):
        logits = [pos[b].item() / tau] + [s / tau for s in neg[b].tolist()]
        total -= math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    return total / len(pos)


@pytest.mark.parametrize("tau", [0.07, 0.5, 0.012])  # 1/0.012 = 83: exp near fp32's limit, must stay finite
def test_losses_match_loops(tau):
    pos, neg = scores(5, 11, seed=int(tau * 1000))
    n_data = 1000
    z = z_loop(pos, neg, tau, n_data)
    got_z = estimate_z(pos, neg, tau, n_data)
    assert got_z.dtype == torch.float32 and got_z.dim() == 0
    assert math.isclose(got_z.item(), z, rel_tol=1e-5)
    assert math.isclose(nce_loss(pos, neg, tau, n_data, z).item(), nce_loop(pos, neg, tau, n_data, z), rel_tol=1e-5)
    assert math.isclose(nce_loss(pos, neg, tau, n_data, torch.tensor(z)).item(),
                        nce_loop(pos, neg, tau, n_data, z), rel_tol=1e-5)  # Z as a buffer tensor
    assert math.isclose(info_nce_loss(pos, neg, tau).item(), infonce_loop(pos, neg, tau), rel_tol=1e-5)


def test_losses_stable_far_outside_loop_range():
    pos, neg = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, -1.0], [1.0, 0.5]])
    tau = 0.001  # exp(1000) overflows even float64; the log-space forms must not
    for value in (nce_loss(pos, neg, tau, 10, 1e30), info_nce_loss(pos, neg, tau)):
        assert torch.isfinite(value), "losses must be computed in log space"
    # nce: log P = s/tau - log Z = 1000 - 69.08 for the top scores; softplus keeps it exact
    log_c, log_z = math.log(2 / 10), math.log(1e30)
    def sp(x):  # softplus, stable in float64
        return max(x, 0) + math.log1p(math.exp(-abs(x)))

    def lp(s):
        return s / tau - log_z

    expected = (sp(log_c - lp(1.0)) + sp(lp(1.0) - log_c) + sp(lp(-1.0) - log_c)
                + sp(log_c - lp(-1.0)) + sp(lp(1.0) - log_c) + sp(lp(0.5) - log_c)) / 2
    assert math.isclose(nce_loss(pos, neg, tau, 10, 1e30).item(), expected, rel_tol=1e-5)
    # info_nce: sample 0 ties pos with a negative (loss log 2), sample 1 has a negative far above pos
    assert math.isclose(info_nce_loss(pos, neg, tau).item(), (math.log(2) + 2000.0) / 2, rel_tol=1e-5)


def test_gradients_flow_to_scores():
    pos, neg = scores(3, 4, seed=1)
    pos.requires_grad_(), neg.requires_grad_()
    (nce_loss(pos, neg, 0.07, 50, 3.0) + info_nce_loss(pos, neg, 0.07)).backward()
    assert pos.grad.abs().sum() > 0 and neg.grad.abs().sum() > 0
    assert (pos.grad < 0).all()  # a higher positive score lowers both losses


def test_validation():
    pos, neg = scores(2, 3, seed=2)
    with pytest.raises(ValueError, match="> 0"):
        nce_loss(pos, neg, 0.0, 10, 1.0)
    with pytest.raises(ValueError, match="K >= 1"):
        info_nce_loss(pos, neg[:, :0], 0.07)
    with pytest.raises(ValueError, match=r"pos \(B,\)"):
        info_nce_loss(pos[:, None], neg, 0.07)
    with pytest.raises(ValueError, match="nce.*infonce"):
        PIRLCriterion(LossConfig(kind="softmax"), 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PIRLCriterion(LossConfig(lam=1.2), 10)
    with pytest.raises(ValueError, match="> 0"):
        PIRLCriterion(LossConfig(temperature=-0.07), 10)


def unit(b, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)


@pytest.mark.parametrize("kind,z", [("nce", "per_term"), ("nce", "shared"), ("infonce", "per_term")])
def test_criterion_end_to_end(kind, z):
    """z=shared is the reference's (vissl/losses/nce_loss.py): one Z, estimated in the first term's first
    forward (the patches), then found set by the image term; per_term estimates each from its own scores."""
    n, d, k, b, tau, lam = 60, 8, 17, 4, 0.1, 0.3
    cfg = BankConfig(num_negatives=k, kernel="torch", seed=9)
    bank, twin = MemoryBank(n, d, cfg), MemoryBank(n, d, cfg)  # twin replays the draws independently
    crit = PIRLCriterion(LossConfig(kind=kind, temperature=tau, lam=lam, z=z), n)
    index = torch.tensor([0, 7, 7, 59])
    zs = None
    for step in range(2):
        f = unit(b, d, 10 + step).requires_grad_()
        g = unit(b, d, 20 + step).requires_grad_()
        terms = crit(f, g, index, bank)
        m = twin.bank[index].double()
        expected = {}
        for name, q in (("jigsaw", g), ("image", f)):  # draw order: jigsaw first, then image
            negs = twin.sample_negatives(b)
            qd = q.detach().double()
            pos = (m * qd).sum(1)
            neg = torch.stack([twin.bank[negs[i]].double() @ qd[i] for i in range(b)])
            if kind == "infonce":
                expected[name] = infonce_loop(pos, neg, tau)
            else:
                if step == 0:
                    zs = zs or {}
                    # estimated on the first batch only, then frozen; shared: the jigsaw term's, for both
                    zs[name] = zs["jigsaw"] if z == "shared" and name == "image" else z_loop(pos, neg, tau, n)
                expected[name] = nce_loop(pos, neg, tau, n, zs[name])
        assert math.isclose(terms.jigsaw.item(), expected["jigsaw"], rel_tol=1e-5)
        assert math.isclose(terms.image.item(), expected["image"], rel_tol=1e-5)
        assert math.isclose(terms.total.item(), lam * expected["jigsaw"] + (1 - lam) * expected["image"], rel_tol=1e-5)
        terms.total.backward()
        assert f.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    if kind == "nce":
        assert math.isclose(crit.z_jigsaw.item(), zs["jigsaw"], rel_tol=1e-5)
        assert math.isclose(crit.z_image.item(), zs["image"], rel_tol=1e-5)
        assert (crit.z_image.item() == crit.z_jigsaw.item()) == (z == "shared")
    else:
        assert torch.isnan(crit.z_image) and torch.isnan(crit.z_jigsaw)


def test_z_saved_and_not_reestimated_after_load():
    n, d = 40, 8
    bank = MemoryBank(n, d, BankConfig(num_negatives=5, kernel="torch"))
    crit = PIRLCriterion(LossConfig(), n)
    assert torch.isnan(crit.z_image) and torch.isnan(crit.z_jigsaw)
    index = torch.arange(3)
    crit(unit(3, d, 1), unit(3, d, 2), index, bank)
    saved = crit.state_dict()
    resumed = PIRLCriterion(LossConfig(), n)
    resumed.load_state_dict(saved)
    resumed(unit(3, d, 3), unit(3, d, 4), index, bank)  # a different batch: Z must stay frozen
    assert torch.equal(resumed.z_image, saved["z_image"]) and torch.equal(resumed.z_jigsaw, saved["z_jigsaw"])
    fresh = PIRLCriterion(LossConfig(), n)
    fresh.load_state_dict(PIRLCriterion(LossConfig(), n).state_dict())  # NaN Z loaded: estimate again
    fresh(unit(3, d, 3), unit(3, d, 4), index, bank)
    assert torch.isfinite(fresh.z_image) and torch.isfinite(fresh.z_jigsaw)
