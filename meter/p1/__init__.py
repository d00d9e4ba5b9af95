"""The DSMR P1 reader: a smart meter's consumer port as a meterproof meter.

It reads telegrams from a serial port, a TCP stream or a recording, checks them, maps
their OBIS registers to a reading, signs it as its own device identity and publishes it
through the reference meter client (outbox, receipts, republish).
"""
