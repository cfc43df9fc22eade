"""One PPO trainer for KL-constrained RLHF (``ppo``), vBoN (``vbon``) and BOND's backward half.

The three methods differ only in the sequence reward and, for BOND, an extra forward-KL term:

* ``ppo``:  R(y) = r(y) (the proxy reward), KL coefficient beta from config (fixed or adaptive);
* ``vbon``: R(y) = log F̂(r(y)) (``l1`` bound) or the exact bound, beta = 1/(n - 1)
  (docs/METHODS.md, "vBoN objective"); the caller's ``reward_fn`` does the CDF lookup;
* ``bond``: the backward-KL (PPO) loss mixed with a forward-KL SFT term on best-of-n responses,
  see ``sft_weight`` below.

Per step (one PPO iteration, docs/METHODS.md "KL-constrained RLHF"):

1. **Rollout.** ``rollout_batch_size`` prompt indices are taken from a seeded, shuffled order that
   is cycled through (re-shuffled after each pass). Prompts are ``encode_prompt`` ids (BOS + text),
   left-padded for ``generate`` (sampling with ``temperature``; ``top_p = 1`` and ``top_k = 0``:
   :class:`PPOConfig` refuses truncation, under which the KL penalty to the truncated reference
   is infinite as soon as the policy samples outside its support). Each response is cut after its first EOS (the EOS is kept); an unfinished
   response keeps all ``max_new_tokens`` tokens.
2. **Scoring.** Responses are decoded (``skip_special_tokens=True``) and passed to
   ``reward_fn(prompt_indices, response_texts, response_ids) -> float64 array (B,)``.
3. **Log-probs and values.** One forward pass over right-padded prompt + response (positions
   0..L-1, as in training) under the policy (old log-probs and values) and under the frozen
   reference (a deep copy of the policy taken before training). Token y_j of a response that
   starts at position P is scored by the logits at position P + j - 1; the value V_j is the value
   head applied to the last hidden state at the same position (the state *before* emitting y_j).
   Log-probs are those of the sampling distribution
   (:func:`pipeline_lib.math.logprobs.sampling_logprobs`: ``logits / temperature``) for the
   policy, the old policy and the reference, so that the ratio and the KL penalty refer to the
   distributions that are sampled, the same π and π_ref as the cache and the evaluation; with
   the default ``temperature = 1`` these are the plain model log-probs.
4. **Rewards and advantages.** :func:`~pipeline_lib.math.ppo_math.token_rewards` (per-token KL
   penalty -beta (log pi - log pi_ref), sequence reward at the last response token, optional
   clipping), :func:`~pipeline_lib.math.ppo_math.gae_advantages` (gamma, lambda) and, optionally,
   :func:`~pipeline_lib.math.ppo_math.whiten` of the advantages over the rollout.
5. **Optimisation.** ``ppo_epochs`` passes over shuffled minibatches of the rollout; each update
   minimises ``ppo_policy_loss + vf_coef * ppo_value_loss`` (both clipped), with gradient norm
   clipping at 1.0 and AdamW (constant ``lr``).
6. The KL controller (fixed, or adaptive with ``kl_target``/``kl_horizon``) is updated with the
   rollout's mean per-sequence k1 KL.

**BOND mix (``sft_weight = w > 0`` with ``sft_examples``).** Each update also draws a minibatch
of (prompt ids, response ids) best-of-n examples and computes their negative log-likelihood
*per target token* (under the same sampling distribution; ``losses.token_mean_nll``: summed over
the minibatch's response tokens, divided by their number), the token mean that the PPO losses
use too, so that the two terms are on one scale. The loss becomes

    L = (1 - w) * L_PPO + w * NLL_tok      (= losses.bond_loss(NLL_tok, L_PPO, 1 - w)),

the Jeffreys-divergence mix of BOND: the NLL is the forward-KL (mode-covering) term and the PPO
loss the backward-KL (mode-seeking) term. Note ``w`` weights the *forward* term here, i.e.
``w = 1 - beta_BOND`` in the paper's J_beta = (1 - beta) KL_fwd + beta KL_bwd.

**Model state.** Dropout is disabled throughout (the policy is kept in ``eval()`` mode while it
is trained), so that the PPO ratio is exactly 1 on the first update of each rollout. The value
head is a zero-initialised ``nn.Linear(hidden_size, 1)`` on the policy's last hidden state
(``output_hidden_states=True``), held with the policy in :class:`PolicyWithValueHead`; it shares
the policy trunk (value gradients reach the trainable blocks). ``trainable_top_layers = k`` trains
only the top k transformer blocks, the final norm, the LM head when it is not tied to the input
embeddings, and the value head. The returned policy is the plain HF causal LM.

**Checkpoints** (``checkpoint_dir/last/``, written to a temporary directory and moved into place
with ``os.replace``; the previous ``last`` is kept as ``last.old`` until the new one is in place):
``policy/`` (``save_pretrained``, safetensors), ``value_head.safetensors``, ``optimizer.pt``,
``rng.pt`` (torch CPU/CUDA RNG states), and ``trainer_state.json`` (step, KL coefficient, numpy
generator state, prompt/SFT cycling positions, config, seed and the log rows so far). Both
``.pt`` files are read back with ``torch.load(..., weights_only=True)``. A run started on a
directory that holds a checkpoint continues from its step (``cfg.steps`` is the *total* number of
steps), so a killed job resumes; on CPU the resumed run reproduces the uninterrupted one exactly.

**Log rows** (one per ``log_every`` steps, and the last): ``step``, ``loss`` (total, mean over
the step's updates), ``policy_loss``, ``value_loss``, ``reward`` and ``score`` (both the mean of
the ``reward_fn`` output, before ``reward_clip``), ``kl_k1`` (mean over the rollout of the
per-sequence sum_t (log pi - log pi_ref)), ``kl_k3`` (mean per-token k3), ``entropy`` (mean
per-token entropy of the sampling policy), ``kl_coef`` (the beta used for this rollout),
``lr``, ``clipfrac``, ``value_clipfrac``, ``approx_kl``, ``grad_norm`` (before clipping),
``sft_nll`` (the SFT minibatches' NLL per target token, the term as it enters the loss; None
without the BOND term),
``response_length`` (mean tokens, EOS included), ``prompts_seen`` and ``elapsed_s``. KL and
entropy use the sampling distribution's log-probs (the model's own at ``temperature = 1``).

Nothing assumes a GPU: ``accelerate`` places the model and applies mixed precision;
``accelerate``'s state is process-global, so one process cannot switch ``mixed_precision``
between calls (as for the other training loops).

**Several processes** (``accelerate launch``, DDP or DeepSpeed ZeRO-2/3): ``rollout_batch_size``
and ``minibatch_size`` are *global* sizes and must be multiples of the number of processes W.
Every rank draws the same prompt indices and minibatch orders (the numpy generator is seeded
alike), generates and scores its contiguous share B/W of the rollout (its own torch seed), and
optimises on minibatches of mb/W of its own rows; gradients are averaged over ranks. Advantages
are whitened with the mean and variance over all ranks' tokens; the KL controller and every
logged statistic use values reduced over ranks, so the log has one row per step, written by the
main process, which also writes the checkpoints (under ZeRO-3 the weights are gathered first;
each rank keeps its optimizer shard, see :mod:`pipeline_lib.train.checkpoints`). The frozen reference
is a full copy on every rank. With W = 1 everything is as described above.
"""
