"""Sessions: one sandbox kept for one principal's calls, and the session host's protocol (issue 18)."""
