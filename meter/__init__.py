"""The reference meter client (sign + publish) and the fleet simulator."""
