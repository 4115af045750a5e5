"""Share of the gradient weight each role gets under each --loss-agg mode (docs/fidelity.md).

    PYTHONPATH=.:kernels python bench/loss_agg_shares.py

Scripted trajectories, no model: the lengths are those of the measured CPU default step
(bench/results/loop.md, seed 0: traj Q/R/V 5/12/4; ~1,000-token questioner and responder
prompts at --ctx 512, responder answers 68 tokens on average, questioner outputs cut at 160,
verifier prompts ~250 tokens and ~120-token judgments) and of SPEC scale (N = 128 kept groups
of G = 8, 16k-token documents: 17k-token responder prompts, ~600-token answers; 128 questioner
positives + 128 negatives over 5 documents, ~6k prompts, ~400-token outputs; 16 verifier groups
of 8 with ~700-token prompts and ~300-token judgments). The share is a role's summed w_t:
how much of the loss's scale (and, for equal per-token gradients, of the gradient) it holds.
"""
from spell_core.training.loss_weights import LOSS_AGG_MODES, role_shares, trajectory_token_weights

SCENARIOS = {
    "CPU default (measured step)": [("questioner", 5, 1000, 160), ("responder", 12, 1000, 68),
                                    ("verifier", 4, 250, 120)],
    "SPEC scale (assumed lengths)": [("questioner", 256, 6000, 400), ("responder", 1024, 17000, 600),
                                     ("verifier", 128, 700, 300)],
}


def main():
    for name, spec in SCENARIOS.items():
        roles = [r for r, n, _, _ in spec for _ in range(n)]
        prompts = [p for _, n, p, _ in spec for _ in range(n)]
        responses = [a for _, n, _, a in spec for _ in range(n)]
        print(f"{name}: trajectories Q/R/V {'/'.join(str(n) for _, n, _, _ in spec)}")
        for mode in LOSS_AGG_MODES:
            shares = role_shares(roles, responses, trajectory_token_weights(prompts, responses, mode))
            print(f"  {mode:<20} " + "  ".join(f"{r} {shares[r]:.3f}" for r in ("questioner", "responder", "verifier")))


if __name__ == "__main__":
    main()
