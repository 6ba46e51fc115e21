"""What a fine-tuning file costs: epochs as the service resolves them, billed tokens, and the price table.

The price table itself is a params default (``jsonl.prices_per_million`` in :mod:`touchvl.params`): one table,
so the JSONL report, the fine-tune plan, the review flow and ``touchvl validate`` (inside a project or not)
can never disagree on a file's cost.
"""
from __future__ import annotations

from touchvl.chat.validate import DEFAULT_CONTEXT, MODEL_CONTEXT, Summary
from touchvl.params import JsonlParams

DEFAULT_PRICES = JsonlParams().prices_per_million  # the schema default, not a second table


def auto_epochs(n_examples: int) -> int:
    """How the service resolves ``n_epochs: auto`` (OpenAI's published rule)."""
    target, min_examples, max_examples = 3, 100, 25_000
    if n_examples == 0:
        return target
    if n_examples * target < min_examples:
        return min(25, min_examples // n_examples)
    if n_examples * target > max_examples:
        return max(1, max_examples // n_examples)
    return target


def cost_estimate(summary: Summary, model: str, prices_per_million: dict[str, float], context: int | None = None,
                  n_epochs: int | str = "auto") -> dict:
    context = context or MODEL_CONTEXT.get(model, DEFAULT_CONTEXT)
    billed = sum(min(context, t) * c for t, c in summary.tokens.items())
    epochs = auto_epochs(sum(summary.tokens.values())) if n_epochs == "auto" else int(n_epochs)
    price = prices_per_million.get(model)
    return {"model": model, "billed_tokens_per_epoch": billed, "epochs": epochs, "epochs_setting": n_epochs,
            "trained_tokens": billed * epochs, "price_per_million": price,
            "cost_usd": round(billed * epochs * price / 1e6, 4) if price is not None else None}
