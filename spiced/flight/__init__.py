"""Arrow Flight / Flight SQL service and the TLS front that terminates TLS in front of it."""
