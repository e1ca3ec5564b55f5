"""Device side of Field Relay: links, byte buffers, line framing and a device simulator."""
