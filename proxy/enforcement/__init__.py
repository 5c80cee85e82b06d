"""Enforcement: turning a decision into what is sent upstream and to the client."""
