"""Draft/target pairs that need no training: for notebooks, smoke runs and benchmarks.

Speculative decoding only pays when the draft is *much cheaper* than the target and *often
agrees* with it.  Two random models never agree, so the demo pair is built the way
"self-speculative" / early-exit methods (LayerSkip, Draft & Verify) build theirs: the draft is
the target's own first layers plus its output head.

:func:`truncated_draft` cuts any ``DecoderOnlyTransformer`` that way.  For a trained model the
result is a weak draft unless the model was trained for early exit; :func:`make_demo_pair`
therefore draws random weights in which the later blocks only nudge the residual stream
(their output projections are scaled by ``late_layer_scale``), so the cut model agrees with
the full one most of the time while costing a fraction of a pass.
"""

from __future__ import annotations

import torch

from transformer import DecoderOnlyTransformer, ModelConfig


def truncated_draft(target: DecoderOnlyTransformer, n_layers: int) -> DecoderOnlyTransformer:
    """A new model with ``target``'s embeddings, first ``n_layers`` blocks, final norm and head (copied).

    Cost of one pass: roughly ``n_layers / target.config.n_layers`` of the target's, plus the
    embedding and output head.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= target.config.n_layers:
        raise ValueError(f"n_layers must be an int in [1, {target.config.n_layers}] (the target's layers), "
                         f"got {n_layers!r}")
    draft = DecoderOnlyTransformer(target.config.replace(n_layers=n_layers))
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("decoder.blocks.") or int(k.split(".")[2]) < n_layers}
    draft.load_state_dict(state)
    return draft.to(next(target.parameters()).device).eval()


def make_demo_pair(vocab_size: int = 512, d_model: int = 128, n_layers: int = 8, n_heads: int = 4,
                   draft_layers: int = 1, late_layer_scale: float = 0.03, std: float = 0.25,
                   max_seq_len: int = 512, seed: int = 0):
    """``(target, draft)``: a random ``n_layers`` target and its first ``draft_layers`` as the draft.

    Weight matrices are ``N(0, std)`` (peaked, non-trivial next-token distributions); residual
    output projections get ``std * 4 / sqrt(d_model)`` so activations stay in range, times
    ``late_layer_scale`` in blocks ``>= draft_layers``.  Smaller ``late_layer_scale`` -> the
    models agree more (higher acceptance).  Both models are returned in eval mode.
    """
    torch.manual_seed(seed)
    target = DecoderOnlyTransformer(ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                                n_heads=n_heads, max_seq_len=max_seq_len))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.dim() < 2:
                continue
            s = std
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                s = std * 4 / d_model ** 0.5
                if int(name.split(".")[2]) >= draft_layers:
                    s *= late_layer_scale
            p.copy_(torch.randn(p.shape, generator=g) * s)
    target.eval()
    return target, truncated_draft(target, draft_layers)
