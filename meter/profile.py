"""Plausible household load and rooftop-solar curves, and the registers they add up to.

The registers are a pure function of (profile, ts): the energy since the meter was
installed, read from a per-day cumulative table kept in integer milliwatt-hours. So they
never decrease in `ts` order (every step adds a non-negative integer), need no stored
state, and carry on where they left off when a simulated meter or the whole simulator
restarts - reusing a meter whose registers restarted from zero would be
`register_decreased` for the ingest side.

Each household keeps a fixed UTC offset (whole hours, never DST, so the day shape cannot
jump an hour back). The fleet spreads over every time zone, so whenever a demo runs some
prosumers are in their midday and export.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Final

from meterproof.meter.measurement import Measurement

DAY_MS: Final = 86_400_000
STEP_MS: Final = 900_000  # integrated in 15-minute steps, a meter's usual register period
STEPS: Final = DAY_MS // STEP_MS
#: Installation dates are drawn before this instant, so they do not depend on "now".
REFERENCE_MS: Final = 1_735_689_600_000  # 2025-01-01T00:00:00Z
YEAR_MS: Final = 365 * DAY_MS
HOUR_MS: Final = 3_600_000


def _bump(hour: float, centre: float, width: float) -> float:
    return math.exp(-(((hour - centre) / width) ** 2))


@dataclass(frozen=True, slots=True)
class Profile:
    """One household: always-on load, morning and evening peaks, optional rooftop PV."""

    base_w: float
    morning_w: float
    evening_w: float
    pv_peak_w: float
    installed_ms: int
    utc_offset_h: int = 0
    sunrise_h: float = 6.0
    sunset_h: float = 20.0
    _import: list[int] = field(init=False, repr=False, compare=False)
    _export: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if min(self.base_w, self.morning_w, self.evening_w, self.pv_peak_w) < 0:
            raise ValueError("powers must not be negative")
        if not 0 <= self.sunrise_h < self.sunset_h <= 24:
            raise ValueError("need 0 <= sunrise_h < sunset_h <= 24")
        if not -12 <= self.utc_offset_h <= 14:
            raise ValueError(f"utc_offset_h {self.utc_offset_h} is not a time zone")
        imports, exports = [0], [0]
        for step in range(STEPS):
            hour = (step + 0.5) * STEP_MS / HOUR_MS
            net_w = self.load_w(hour) - self.solar_w(hour)
            # W over 15 minutes = W / 4 Wh = W * 250 mWh
            imports.append(imports[-1] + round(max(net_w, 0.0) * 250))
            exports.append(exports[-1] + round(max(-net_w, 0.0) * 250))
        object.__setattr__(self, "_import", imports)
        object.__setattr__(self, "_export", exports)

    def load_w(self, hour: float) -> float:
        return (
            self.base_w
            + self.morning_w * _bump(hour, 7.5, 1.0)
            + self.evening_w * _bump(hour, 19.0, 1.8)
            + 0.3 * self.evening_w * _bump(hour, 12.5, 1.2)
        )

    def solar_w(self, hour: float) -> float:
        if not self.sunrise_h < hour < self.sunset_h:
            return 0.0
        daylight = (hour - self.sunrise_h) / (self.sunset_h - self.sunrise_h)
        return self.pv_peak_w * math.pow(math.sin(math.pi * daylight), 1.5)

    def registers_at(self, ts_ms: int) -> tuple[int, int]:
        """(import_wh, export_wh): cumulative since installation, never decreasing in ts."""
        if ts_ms <= self.installed_ms:
            return 0, 0
        now, then = self.local_ms(ts_ms), self.local_ms(self.installed_ms)
        imp = _cumulative(self._import, now) - _cumulative(self._import, then)
        exp = _cumulative(self._export, now) - _cumulative(self._export, then)
        return imp // 1000, exp // 1000

    def local_ms(self, ts_ms: int) -> int:
        return ts_ms + self.utc_offset_h * HOUR_MS

    def measure(self, ts_ms: int, rng: random.Random) -> Measurement:
        """A full reading at `ts_ms`; only the instantaneous values carry noise."""
        hour = (self.local_ms(ts_ms) % DAY_MS) / HOUR_MS
        import_wh, export_wh = self.registers_at(ts_ms)
        power_w = round((self.load_w(hour) - self.solar_w(hour)) * rng.uniform(0.95, 1.05))
        voltage_mv = round(rng.gauss(230_000, 1_500))
        power_factor_milli = rng.randint(930, 995)
        current_ma = round(abs(power_w) * 1_000_000 / (voltage_mv * power_factor_milli / 1000))
        return Measurement(
            ts=ts_ms,
            import_wh=import_wh,
            export_wh=export_wh,
            power_w=power_w,
            voltage_mv=voltage_mv,
            current_ma=current_ma,
            frequency_mhz=round(rng.gauss(50_000, 15)),
            power_factor_milli=power_factor_milli,
        )


def _cumulative(table: list[int], local_ms: int) -> int:
    """mWh from local midnight of day 0 to `local_ms`: whole days plus today's table."""
    days, into_day = divmod(local_ms, DAY_MS)
    step, into_step = divmod(into_day, STEP_MS)
    in_step = (table[step + 1] - table[step]) * into_step // STEP_MS
    return days * table[-1] + table[step] + in_step


def profile_for(meter_id: str, *, prosumer_share: float = 0.4) -> Profile:
    """The same meter id always gets the same household, in every process."""
    if not 0.0 <= prosumer_share <= 1.0:
        raise ValueError(f"prosumer_share must be within [0, 1], not {prosumer_share}")
    seed = int.from_bytes(hashlib.sha256(meter_id.encode()).digest()[:8], "big")
    rng = random.Random(seed)  # noqa: S311 - a simulated household, not a secret
    prosumer = rng.random() < prosumer_share
    return Profile(
        base_w=rng.uniform(120, 400),
        morning_w=rng.uniform(300, 1200),
        evening_w=rng.uniform(600, 2200),
        pv_peak_w=rng.uniform(2500, 6500) if prosumer else 0.0,
        installed_ms=REFERENCE_MS - rng.randrange(YEAR_MS // 2, 5 * YEAR_MS),
        utc_offset_h=rng.randint(-11, 12),
        sunrise_h=rng.uniform(5.5, 7.0),
        sunset_h=rng.uniform(19.0, 21.0),
    )
