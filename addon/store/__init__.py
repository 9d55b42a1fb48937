"""The SQLite database: schema, migrations, the background writer, the Redis row stream."""
