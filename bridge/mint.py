"""GRID minting from export registers (pure): 1 kWh exported = 1 GRID = 10**18 base units.

A meter's minted total is always (highest export_wh anchored so far - export_wh of its first
anchored reading) / 1000 GRID. Each batch mints only the increase of that highest value since
the previous batch, so a duplicate, a late reading or one with a lower register mints
nothing, and nothing is ever minted twice or negative. Import deltas are tracked the same
way for settlement; they are recorded, never minted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

GRID_DECIMALS: Final = 18
UNITS_PER_GRID: Final = 10**GRID_DECIMALS
#: 1 GRID = 1 kWh, so 1 Wh = 10**15 base units.
UNITS_PER_WH: Final = UNITS_PER_GRID // 1000


@dataclass(frozen=True, slots=True)
class MeterBatch:
    """One meter's readings in one batch: the first in (ts, seq) order, and the highest."""

    meter_id: str
    first_export_wh: int
    first_import_wh: int
    max_export_wh: int
    max_import_wh: int


@dataclass(frozen=True, slots=True)
class MeterState:
    """What the bridge remembers per meter, so a batch never rescans history."""

    baseline_export_wh: int
    baseline_import_wh: int
    max_export_wh: int
    max_import_wh: int
    first_batch: int
    last_batch: int


@dataclass(frozen=True, slots=True)
class Mint:
    """One line of a batch's mint list."""

    meter_id: str
    wallet: str | None
    export_wh: int
    import_wh: int

    @property
    def units(self) -> int:
        return self.export_wh * UNITS_PER_WH


def advance(agg: MeterBatch, state: MeterState | None, batch: int) -> tuple[MeterState, int, int]:
    """(new state, export delta Wh, import delta Wh) after one more batch of this meter."""
    if state is None:
        state = MeterState(
            baseline_export_wh=agg.first_export_wh,
            baseline_import_wh=agg.first_import_wh,
            max_export_wh=agg.first_export_wh,
            max_import_wh=agg.first_import_wh,
            first_batch=batch,
            last_batch=batch,
        )
    export_delta = max(0, agg.max_export_wh - state.max_export_wh)
    import_delta = max(0, agg.max_import_wh - state.max_import_wh)
    new = MeterState(
        baseline_export_wh=state.baseline_export_wh,
        baseline_import_wh=state.baseline_import_wh,
        max_export_wh=state.max_export_wh + export_delta,
        max_import_wh=state.max_import_wh + import_delta,
        first_batch=state.first_batch,
        last_batch=batch,
    )
    return new, export_delta, import_delta


def mint_batch(
    batch: int,
    aggregates: Iterable[MeterBatch],
    states: Mapping[str, MeterState],
    wallets: Mapping[str, str | None],
) -> tuple[list[Mint], dict[str, MeterState]]:
    """The batch's mint list (meters with a non-zero delta, by meter id) and new states."""
    mints: list[Mint] = []
    new_states: dict[str, MeterState] = {}
    for agg in aggregates:
        state, export_delta, import_delta = advance(agg, states.get(agg.meter_id), batch)
        new_states[agg.meter_id] = state
        if export_delta or import_delta:
            mints.append(Mint(agg.meter_id, wallets.get(agg.meter_id), export_delta, import_delta))
    mints.sort(key=lambda m: m.meter_id)
    return mints, new_states


def format_grid(units: int) -> str:
    """Base units as a decimal GRID amount without trailing zeros: 1500 * 10**15 -> '1.5'."""
    whole, fraction = divmod(units, UNITS_PER_GRID)
    digits = f"{fraction:0{GRID_DECIMALS}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)
