"""What a run reports: :class:`Summary` (after a run) and :class:`DryRunReport` (after --dry-run)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..exit_codes import (
    EXIT_BUDGET,
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_JOB_ERROR,
    EXIT_OK,
    EXIT_WAITING,
)
from ..kimi import cost_usd
from ..stats import accuracy_text

FAILED_STATUSES = ("error", "invalid", "truncated")


def resume_time(epoch_s: float) -> str:
    """'14:32 local (06:32 UTC), in 29 min': when a run told to wait can go on."""
    import datetime
    import time

    local = datetime.datetime.fromtimestamp(epoch_s).astimezone()
    utc = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    minutes = max(0, round((epoch_s - time.time()) / 60))
    day = "" if local.date() == datetime.datetime.now().astimezone().date() else f"{local:%Y-%m-%d} "
    return f"{day}{local:%H:%M} local ({utc:%H:%M} UTC), in {minutes} min"


@dataclass
class Summary:
    output: str
    total_rows: int
    already_done: int
    sent_rows: int = 0
    run_status: Counter[str] = field(default_factory=Counter)  # rows finished in this run
    final_status: dict[str, int] = field(default_factory=dict)  # the whole output after this run
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0  # of the rows whose cost is known
    rows_without_usage: int = 0  # answered rows whose server reported no usage
    rows_without_cost: int = 0  # answered rows whose cost cannot be computed (no usage, or no price)
    wall_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False
    stop_reason: str | None = None
    fatal: str | None = None
    notes: list[str] = field(default_factory=list)  # what the input said (a folder's walk)
    budget_stop: str | None = None  # why the run stopped at its budget
    wait_until: float | None = None  # epoch seconds: the run stopped because the account must wait until then
    wait_reason: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)  # what scoring the whole output found

    def add_row(self, row: dict[str, Any]) -> None:
        """Count one finished result row of this run."""
        status = row["status"]
        self.run_status[status] += 1
        self.prompt_tokens += row.get("prompt_tokens") or 0
        self.completion_tokens += row.get("completion_tokens") or 0
        self.cached_tokens += row.get("cached_tokens") or 0
        if status in ("ok", "truncated"):
            if row.get("total_tokens") is None:
                self.rows_without_usage += 1
            if row.get("cost_usd") is None:
                self.rows_without_cost += 1
            else:
                self.cost_usd += row["cost_usd"]
        if status != "ok":
            message = row.get("error_message") or ""
            self.errors[f"{row.get('error_type')}: {message[:160]}{'...' if len(message) > 160 else ''}"] += 1

    @property
    def pending_rows(self) -> int:
        return max(0, self.total_rows - sum(self.final_status.values()))

    @property
    def failed_rows(self) -> int:
        return sum(self.final_status.get(s, 0) for s in FAILED_STATUSES)

    @property
    def exit_code(self) -> int:
        """0 all rows ok; 1 job-level error; 3 finished with failed rows; 4 stopped at the budget;
        6 stopped because the account must wait (a quota); 130 interrupted."""
        if self.fatal:
            return EXIT_JOB_ERROR
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.wait_until is not None:
            return EXIT_WAITING
        if self.budget_stop:
            return EXIT_BUDGET
        if self.failed_rows or self.pending_rows:
            return EXIT_FAILED_ROWS
        return EXIT_OK

    def lines(self) -> list[str]:
        out = list(self.notes)
        final = ", ".join(f"{k} {v}" for k, v in sorted(self.final_status.items())) or "none"
        run = ", ".join(f"{k} {v}" for k, v in sorted(self.run_status.items())) or "nothing"
        out.append(f"output: {self.output}  ({self.total_rows} input rows: {final}; pending {self.pending_rows})")
        out.append(f"this run: {run} in {self.wall_s:.1f}s; {self.already_done} rows were already done")
        out.append(
            f"requests {self.requests}, retries {self.retries}, 429s {self.rate_limited}; tokens: prompt "
            f"{self.prompt_tokens} (cached {self.cached_tokens}), completion {self.completion_tokens}; "
            f"cost {self.cost_text()}"
        )
        if self.rows_without_usage:
            out.append(f"{self.rows_without_usage} answered rows came without token usage: their tokens and cost "
                       "are unknown (the server reports usage in streams only when asked: set include_usage = true)")
        if self.scores.get("scored"):
            s = self.scores
            head = (f"accuracy {accuracy_text(s['right'], s['decidable'])} over all {s['decidable']} rows with an "
                    "expected value (failed, truncated and unreadable ones count as wrong); " if s.get("decidable") else "")
            out.append(f"{head}{accuracy_text(s['score_sum'], s['scored'])} over the {s['scored']} scored rows alone; "
                       f"`batchkimi report {self.output}` for the rest")
        if self.budget_stop:
            out.append(f"stopped at the budget: {self.budget_stop}. Nothing is lost: run again (with a larger "
                       "budget) to go on.")
        if self.wait_until is not None:
            out.append(f"stopped: the server asks this account to wait until {resume_time(self.wait_until)} "
                       f"({self.wait_reason}). No row failed for it: run the same command then to resume.")
        if self.errors:
            out.append("top errors:")
            out.extend(f"  {n}x {e}" for e, n in self.errors.most_common(5))
        return out

    def cost_text(self) -> str:
        answered = self.run_status.get("ok", 0) + self.run_status.get("truncated", 0)
        if self.rows_without_cost and self.rows_without_cost >= answered:
            return "unknown"
        known = f"${self.cost_usd:.4f}"
        return f"{known} + unknown for {self.rows_without_cost} rows" if self.rows_without_cost else known

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_rows": self.total_rows,
            "already_done": self.already_done,
            "run_status": dict(self.run_status),
            "final_status": dict(self.final_status),
            "requests": self.requests,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cost_usd": None if self.cost_text() == "unknown" else round(self.cost_usd, 6),
            "rows_without_usage": self.rows_without_usage,
            "rows_without_cost": self.rows_without_cost,
            "wall_s": round(self.wall_s, 3),
            "interrupted": self.interrupted,
            "fatal": self.fatal,
            "budget_stop": self.budget_stop,
            "wait_until": self.wait_until,
            "scores": self.scores,
        }


@dataclass
class DryRunReport:
    total_rows: int
    already_done: int
    status: Counter[str]
    invalid_examples: list[str]
    first_request: dict[str, Any] | None
    prompt_tokens_estimate: int
    expected_completion_tokens: int
    max_completion_tokens: int | None
    prices: Any
    model: str
    notes: list[str] = field(default_factory=list)
    # the completion tokens of the requests to send, in 9 runs of 10 if answers have Kimi's assumed
    # shape (None: a simulator of another shape, whose answers that range does not describe)
    completion_range: tuple[int, int] | None = None

    @property
    def to_send(self) -> int:
        return self.status.get("to_send", 0)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items()))
        out = [*self.notes, f"{self.total_rows} rows: {counts}; {self.already_done} already done in the output"]
        for example in self.invalid_examples:
            out.append(f"  invalid: {example}")
        more = self.status.get("invalid", 0) - len(self.invalid_examples)
        if more > 0:
            out.append(f"  ... and {more} more invalid rows")
        low = cost_usd(self.prices, self.model, self.prompt_tokens_estimate, self.expected_completion_tokens * self.to_send, 0)
        if low is None and self.to_send:
            out.append(f"no cost estimate: no price for {self.model} (add it to the job's prices table, "
                       "[input_miss, input_hit, output] USD per 1M tokens; for an ep- id, ep_model names the model)")
        if low is not None:
            line = (
                f"cost estimate for {self.to_send} requests: ${low:.2f} (about {self.prompt_tokens_estimate:,} prompt "
                f"tokens in all, and {self.expected_completion_tokens:,} completion tokens each)"
            )
            if self.max_completion_tokens:
                high = cost_usd(self.prices, self.model, self.prompt_tokens_estimate, self.max_completion_tokens * self.to_send, 0)
                line += f"; at most ${high:.2f} if every answer used max_tokens"
            out.append(line)
            if self.completion_range is not None and self.to_send:
                lo_t, hi_t = self.completion_range
                lo = cost_usd(self.prices, self.model, self.prompt_tokens_estimate, lo_t, 0) or 0.0
                hi = cost_usd(self.prices, self.model, self.prompt_tokens_estimate, hi_t, 0) or 0.0
                out.append(f"likely range, if answers are as long as Kimi's usually are (reasoning and a free-text answer, "
                           f"the simulator's assumption): ${lo:.2f} to ${hi:.2f} ({lo_t:,} to {hi_t:,} completion tokens) "
                           "in 9 runs of 10; prompt caching lowers it")
        return out
