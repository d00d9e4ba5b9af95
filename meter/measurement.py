"""What a meter measured at one instant: the signed fields other than `meter_id` and `seq`."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Measurement:
    ts: int
    import_wh: int
    export_wh: int
    power_w: int | None = None
    voltage_mv: int | None = None
    current_ma: int | None = None
    frequency_mhz: int | None = None
    power_factor_milli: int | None = None

    def fields(self) -> dict[str, int]:
        """The present fields, as `schemas.codec.sign_reading` takes them."""
        return {name: value for name, value in asdict(self).items() if value is not None}
