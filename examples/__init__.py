"""Example applications for jobledger (the demo's operators live here)."""
