"""A budget is a ceiling: :class:`BudgetGate` admits a request only while what the output has
spent so far, plus the worst case of every request in flight and of this one, stays within
``max_cost_usd`` and ``max_total_tokens``.

The worst case of a request is its prompt (the estimate, with a quarter more for a tokenizer
that packs less than the estimate assumes) plus its whole ``max_tokens`` (or, with none sent,
the rest of the context window), priced at the job's prices with no cache discount. A request
that would not fit beside those in flight waits for one of them to finish (its real usage
then replaces its worst case); one that could not fit even alone stops the run (exit 4,
resumable). An answer that came without usage counts at its worst case.

The budget belongs to the output, not to one run: the manifest records what every run spent
(:func:`batchkimi.output.spend.output_spend`), so three runs of the same command with ``--max-cost 0.05`` spend at
most $0.05 together, and a rerun at the cap sends nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..kimi import CONTEXT_LIMIT_TOKENS, cost_usd

PROMPT_MARGIN = 1.25


@dataclass(slots=True)
class Reservation:
    usd: float
    tokens: int


class BudgetGate:
    """See the module docstring. ``prices`` and ``model`` price a worst case; ``spent_*`` is what
    the output spent before this run."""

    def __init__(self, max_usd: float, max_tokens: int, prices: Any, model: str,
                 spent_usd: float = 0.0, spent_tokens: int = 0) -> None:
        self.max_usd, self.max_tokens = max_usd, max_tokens
        self.prices, self.model = prices, model
        self.spent_usd, self.spent_tokens = spent_usd, spent_tokens
        self.before_usd, self.before_tokens = spent_usd, spent_tokens
        self.held_usd, self.held_tokens = 0.0, 0  # worst cases of the requests in flight
        self._settled: asyncio.Future[None] | None = None  # resolved when a request in flight ends

    @property
    def active(self) -> bool:
        return bool(self.max_usd or self.max_tokens)

    def worst(self, prompt_tokens: int, max_tokens: int | None) -> Reservation:
        prompt = int(prompt_tokens * PROMPT_MARGIN) + 1
        completion = max_tokens if max_tokens is not None else max(0, CONTEXT_LIMIT_TOKENS - prompt_tokens)
        usd = cost_usd(self.prices, self.model, prompt, completion, 0) or 0.0
        return Reservation(usd, prompt + completion)

    def over(self, need: Reservation, *, in_flight: bool) -> str | None:
        """Why ``need`` does not fit (beside what is in flight, or alone), or None."""
        held_usd, held_tokens = (self.held_usd, self.held_tokens) if in_flight else (0.0, 0)
        if self.max_usd and self.spent_usd + held_usd + need.usd > self.max_usd + 1e-12:
            return (f"${self.spent_usd:.4f} spent by this output"
                    + (f" and up to ${held_usd:.4f} in flight" if in_flight else "")
                    + f"; the next request could cost up to ${need.usd:.4f}, of a ${self.max_usd:g} budget")
        if self.max_tokens and self.spent_tokens + held_tokens + need.tokens > self.max_tokens:
            return (f"{self.spent_tokens:,} tokens used by this output"
                    + (f" and up to {held_tokens:,} in flight" if in_flight else "")
                    + f"; the next request could use up to {need.tokens:,}, of a {self.max_tokens:,}-token budget")
        return None

    async def admit(self, prompt_tokens: int, max_tokens: int | None) -> Reservation | str:
        """A reservation for this request once it fits; a reason (str) when it never can."""
        if not self.active:
            return Reservation(0.0, 0)
        need = self.worst(prompt_tokens, max_tokens)
        while True:
            never = self.over(need, in_flight=False)
            if never is not None:
                return never
            if self.over(need, in_flight=True) is None:  # checked and taken with no await between
                self.held_usd += need.usd
                self.held_tokens += need.tokens
                return need
            if self._settled is None or self._settled.done():
                self._settled = asyncio.get_running_loop().create_future()
            # shielded: a waiter cancelled by a stop must not cancel the others' wait
            await asyncio.shield(self._settled)

    def settle(self, held: Reservation, usd: float | None, tokens: int | None) -> None:
        """The request ended: its real cost and tokens (None: unknown, counted at the worst case)
        replace its reservation. Call it once, with ``usd = tokens = 0`` for a request not paid."""
        self.spent_usd += held.usd if usd is None else usd
        self.spent_tokens += held.tokens if tokens is None else tokens
        self.held_usd = max(0.0, self.held_usd - held.usd)
        self.held_tokens = max(0, self.held_tokens - held.tokens)
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    def lines(self) -> list[str]:
        out = []
        if self.max_usd:
            share = self.spent_usd / self.max_usd
            out.append(f"budget: ${self.spent_usd:.4f} of ${self.max_usd:g} spent by this output ({share:.0%}); "
                       f"${self.spent_usd - self.before_usd:.4f} by this run")
        if self.max_tokens:
            share = self.spent_tokens / self.max_tokens
            out.append(f"budget: {self.spent_tokens:,} of {self.max_tokens:,} tokens used by this output ({share:.0%}); "
                       f"{self.spent_tokens - self.before_tokens:,} by this run")
        return out
