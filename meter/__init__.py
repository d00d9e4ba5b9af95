"""The reference meter client and the fleet simulator.

`client.MeterClient` signs, stores and publishes readings until their receipts arrive;
`network.Network` drives any number of them on one asyncio loop; `simulate` runs a fleet;
`cli` holds `meterproof simulate` and `meterproof meter run`.
"""
