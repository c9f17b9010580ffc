"""The Label Studio ML backend server: a thin Flask app over `AxxModel` (no science here)."""
