"""What every part of Iros stands on: errors in the OpenAI shape, the request schema, spans and the
request record, admission, timers, SQLite files, and time and duration formats.

Imports no other Iros package."""
