"""BOND's two terms on one scale (issue 15, defect 3).

The backward (vBoN) term is the PPO loss, a mean over response tokens of whitened-advantage
terms; the forward (BoN-SFT) term must be the NLL per target token (``token_mean_nll``), not a
summed sequence NLL (tens of nats), or w < 1 is in effect pure BoN-SFT. Pinned three ways: a toy
where the optimum of the mix moves from the BoN-SFT fit (w = 0) to the vBoN optimum (w = 1) with
w = 0.5 strictly between; the gradients of the two terms at initialisation on a realistic batch
of a tiny LM; and the trainer passing the per-token NLL to ``bond_loss``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline_lib.math.cdf import empirical_cdf
from pipeline_lib.math.losses import bond_loss, token_mean_nll
from pipeline_lib.math.ppo_math import gae_advantages, ppo_policy_loss, token_rewards, whiten
from pipeline_lib.math.vbon import vbon_beta
from pipeline_lib.train.ppo.checkpoint import Cycler
from pipeline_lib.train.ppo.config import PPOConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_mean_nll_is_the_nll_per_valid_token() -> None:
    logp = torch.tensor([[-1.0, -2.0, -float("inf")], [-3.0, -float("nan"), -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(token_mean_nll(logp, mask), torch.tensor(2.0))  # (1+2+3)/3
    with pytest.raises(ValueError, match="at least one"):
        token_mean_nll(logp, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_mean_nll(logp[0], mask[0])


# ------------------------------------------------------------------ toy: where the optimum lies
# A factorised "policy" over T positions with V tokens each, pi(y) = prod_t softmax(theta_t)[y_t],
# an additive reward, and the two halves of BOND exactly as the PPO trainer builds them: the
# backward term is the vBoN PPO loss (reward log F(r), beta = 1/(n - 1), GAE, whitening, the
# clipped surrogate at ratio 1), the forward term the NLL of best-of-n samples of pi_ref.

T, V, N_BON, BATCH = 12, 4, 4, 256


def _toy_task():
    g = torch.Generator().manual_seed(0)
    ref_logits = 0.5 * torch.randn(T, V, generator=g)
    score = torch.randn(T, V, generator=g)
    torch.manual_seed(0)
    ref = torch.distributions.Categorical(logits=ref_logits)
    sorted_rewards = np.sort(_reward(score, ref.sample((8192,))).numpy())
    pools = ref.sample((4096, N_BON))  # (4096, n, T)
    best = pools[torch.arange(4096), _reward(score, pools).argmax(dim=1)]
    return ref_logits, score, sorted_rewards, best


def _reward(score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return score[torch.arange(T), y].sum(dim=-1)


def _logp(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)[torch.arange(T), y]  # (B, T)


def _train_toy(w: float, task, steps: int = 500, seed: int = 0) -> torch.Tensor:
    """The centred logits (T, V) of the mixed objective's optimum, averaged over the last 100
    of ``steps`` Adam steps."""
    ref_logits, score, sorted_rewards, best = task
    torch.manual_seed(seed)
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.1)
    mask = torch.ones(BATCH, T)
    tail = []
    for step in range(steps):
        with torch.no_grad():
            y = torch.distributions.Categorical(logits=theta).sample((BATCH,))
            u = empirical_cdf(sorted_rewards, _reward(score, y).numpy())
            seq_reward = torch.as_tensor(np.log(np.maximum(u, 1e-6)), dtype=torch.float32)
            rewards = token_rewards(seq_reward, _logp(theta, y), _logp(ref_logits, y), mask,
                                    vbon_beta(N_BON), None)
            adv, _ = gae_advantages(rewards, torch.zeros(BATCH, T), mask, 1.0, 0.95)
            adv = whiten(adv, mask)
        logp = _logp(theta, y)
        backward, _, _ = ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2)
        sft = best[torch.randint(0, len(best), (BATCH,))]
        forward = token_mean_nll(_logp(theta, sft), torch.ones(BATCH, T))
        loss = bond_loss(forward, backward, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps - 150:  # settle: smaller steps, then average the iterates
            opt.param_groups[0]["lr"] = 0.01
        if step >= steps - 100:
            tail.append(theta.detach() - theta.detach().mean(dim=1, keepdim=True))
    return torch.stack(tail).mean(dim=0)


def test_w_moves_the_optimum_from_the_bon_sft_fit_to_the_vbon_optimum() -> None:
    task = _toy_task()
    ws = (0.0, 0.25, 0.5, 0.75, 1.0)
    theta = {w: _train_toy(w, task) for w in ws}
    # w = 0 is the BoN-SFT fit: the logits of the best-of-n samples' per-position frequencies
    freq = torch.stack([torch.bincount(task[3][:, t], minlength=V) for t in range(T)]).double()
    fit = torch.log(freq / freq.sum(dim=1, keepdim=True))
    fit = (fit - fit.mean(dim=1, keepdim=True)).float()
    assert float((theta[0.0] - fit).abs().max()) < 0.1
    # the two ends are far apart (0.62; two seeds' w = 1 optima differ by 0.09)
    span = theta[1.0] - theta[0.0]
    assert float(span.norm()) > 0.4
    # position of each optimum along the segment from the BoN-SFT fit (0) to vBoN's (1)
    where = {w: float(((theta[w] - theta[0.0]) * span).sum() / (span * span).sum()) for w in ws}
    assert where[0.25] < where[0.5] < where[0.75]
    assert 0.3 < where[0.5] < 0.7, where  # a summed NLL puts it at ~0.07: near pure BoN-SFT
    assert 0.05 < where[0.25] and where[0.75] < 0.95, where


# ------------------------------------------------- realistic batch: the terms' gradients at init


def test_the_two_terms_have_gradients_of_one_size_at_initialisation(tiny_policy_dir) -> None:
    """A tiny LM's rollout of ~30-token responses: the gradient of the per-token BoN-SFT NLL and
    of the vBoN PPO loss (whitened advantages, ratio 1) on the policy's weights are within a
    factor 3 of each other (0.49 and 0.41); the summed NLL's is ~ the response length times
    larger (14.4). The loss *values* are not what is compared: the surrogate is 0 at ratio 1
    with whitened advantages, whatever its weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pipeline_lib.models.encoding import encode_prompt
    from pipeline_lib.train.ppo.policy import PolicyWithValueHead
    from pipeline_lib.train.ppo.rollout import (
        at_response,
        generate_responses,
        make_batch,
        sft_token_nll,
        token_logprobs,
    )

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    model = PolicyWithValueHead(policy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = GenerationConfig(do_sample=True, max_new_tokens=32, pad_token_id=pad,
                           eos_token_id=tok.eos_token_id, top_k=0)
    texts = ["a great film", "the plot is dull", "an awful mess", "funny and warm"] * 4
    prompts = [encode_prompt(tok, t) for t in texts]
    torch.manual_seed(0)
    responses = generate_responses(policy, prompts, gen, pad, tok.eos_token_id, "cpu")
    pools = [generate_responses(policy, prompts, gen, pad, tok.eos_token_id, "cpu")
             for _ in range(N_BON)]
    rng = np.random.default_rng(0)
    best = [pools[int(rng.integers(N_BON))][i] for i in range(len(prompts))]  # BoN examples

    batch = make_batch(prompts, responses, pad)
    logits, values = model(batch.input_ids, batch.attention_mask)
    logp = token_logprobs(at_response(logits, batch.pos).float(), batch.resp_ids)
    mask = batch.mask
    seq_reward = torch.as_tensor(np.log(rng.uniform(size=len(prompts))), dtype=torch.float32)
    rewards = token_rewards(seq_reward, logp.detach(), logp.detach(), mask, vbon_beta(N_BON), None)
    adv, _ = gae_advantages(rewards, at_response(values, batch.pos).detach(), mask, 1.0, 0.95)
    backward, _, _ = ppo_policy_loss(logp, logp.detach(), whiten(adv, mask), mask, 0.2)

    sft_batch = make_batch(prompts, best, pad)
    forward = sft_token_nll(model, sft_batch)
    params = [p for p in policy.parameters() if p.requires_grad]

    def grad_norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))

    g_bwd, g_fwd = grad_norm(backward), grad_norm(forward)
    mean_len = float(sft_batch.mask.sum(dim=1).mean())
    assert mean_len > 10  # a realistic response length, so a summed NLL would be far off
    assert 1 / 3 < g_fwd / g_bwd < 3, (g_fwd, g_bwd)
    sft_logits, _ = model(sft_batch.input_ids, sft_batch.attention_mask)
    sft_logp = token_logprobs(at_response(sft_logits, sft_batch.pos).float(), sft_batch.resp_ids)
    summed = grad_norm(-(sft_logp * sft_batch.mask).sum(dim=1).mean())  # the old forward term
    assert summed / g_bwd > 0.5 * mean_len * g_fwd / g_bwd


# ------------------------------------------------------------------ the trainer's wiring


def test_the_trainer_mixes_the_nll_per_target_token(monkeypatch) -> None:
    """``_minibatch_step`` gives bond_loss the BoN-SFT NLL per target token (examples of 1 and
    3 tokens under a uniform policy over 5 tokens: log 5 whatever the lengths; a summed NLL
    averaged over the two examples would be 2 log 5)."""
    from pipeline_lib.train.ppo import trainer
    from pipeline_lib.train.ppo.trainer import Rollout

    seen = []

    def spy(forward, backward, w):
        seen.append(float(forward.detach()))
        raise StopIteration

    monkeypatch.setattr(trainer, "bond_loss", spy)
    cfg = PPOConfig(steps=1, rollout_batch_size=2, minibatch_size=2, sft_weight=0.5)
    model = lambda ids, attn: (torch.zeros(ids.shape[0], ids.shape[1], 5, requires_grad=True),  # noqa: E731
                               torch.zeros(ids.shape[0], ids.shape[1]))
    batch = trainer.make_batch([[1, 2], [1]], [[3, 4], [2]], 0)
    run = SimpleNamespace(
        cfg=cfg, acc=SimpleNamespace(device="cpu"), world=1, rank=0, model=model, pad_id=0,
        sft_examples=[([1, 2], [3]), ([1], [2, 3, 4])],
        state=SimpleNamespace(sft_cycler=Cycler(2), rng=np.random.default_rng(0)))
    rollout = Rollout(batch=batch, scores=np.zeros(2), old_logp=torch.zeros(2, 2),
                      old_values=torch.zeros(2, 2), ref_logp=torch.zeros(2, 2), ent_sum=0.0,
                      beta=0.0)
    with pytest.raises(StopIteration):
        trainer._minibatch_step(run, rollout, torch.zeros(2, 2), torch.zeros(2, 2),
                                torch.tensor([0, 1]), {k: [] for k in trainer.UPDATE_STATS})
    assert seen == [pytest.approx(math.log(5))]
