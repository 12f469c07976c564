"""The web dashboard: its page, login form, session cookies and static assets."""
