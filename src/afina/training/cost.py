"""What a run costs: a per-hour price from a price table, a live total, and the budget check.

afina ships a table of common cloud machines (`prices.yaml` beside this file); a `prices.yaml` in
the afina home adds machines or overrides prices (the user's own negotiated rates, say).
"""

from __future__ import annotations

from importlib import resources

import yaml

from afina.errors import AfinaError
from afina.paths import afina_home


def load_price_table() -> dict[str, float]:
    """Machine name -> price per hour (USD): the shipped table updated by `$AFINA_HOME/prices.yaml`."""
    table = yaml.safe_load((resources.files("afina.training") / "prices.yaml").read_text(encoding="utf-8"))
    prices = {name: float(entry["price_per_hour"]) for name, entry in table["machines"].items()}
    user = afina_home() / "prices.yaml"
    if user.is_file():
        try:
            extra = yaml.safe_load(user.read_text(encoding="utf-8")) or {}
            prices.update({name: float(entry["price_per_hour"]) for name, entry in extra.get("machines", {}).items()})
        except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise AfinaError("invalid_price_table", f"cannot read the price table: {exc}", location=str(user),
                             hint="machines: {name: {price_per_hour: 1.23}}") from exc
    return prices


def price_per_hour(machine: str | None, explicit: float | None) -> float:
    """The price of the machine a run uses: an explicit price wins, then the table; 0 when unknown
    (a workstation), so costs show as 0 rather than a guess."""
    if explicit is not None:
        return explicit
    if machine is None:
        return 0.0
    prices = load_price_table()
    if machine not in prices:
        import difflib

        guess = difflib.get_close_matches(machine, list(prices), n=1)
        raise AfinaError("unknown_machine", f"{machine!r} is not in the price table", location="training.machine",
                         hint=f"did you mean {guess[0]!r}?" if guess else "add it to $AFINA_HOME/prices.yaml")
    return prices[machine]


def cost_of(seconds: float, hourly: float) -> float:
    return seconds / 3600 * hourly
