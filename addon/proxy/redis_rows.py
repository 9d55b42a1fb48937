"""mitmproxy addon: with `usage_redis` set, publish committed rows to Redis (store/redis_rows.py) for `collect`."""

from __future__ import annotations

from addon.store.redis_rows import PASSWORD_ENV, Publisher, ping


class RedisRows:
    """mitmproxy addon: with `usage_redis` set, publish committed rows for `collect`."""

    def __init__(self) -> None:
        self.publisher: Publisher | None = None
        self._key: tuple[str, str] | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "usage_redis", str, "",
            "redis://host:port/db (or rediss://) shared by every proxy of a team: pools, reservations, resets "
            f"and alerts are shared and rows are published for `collect`. Password in the URL or ${PASSWORD_ENV}.",
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions

        url = ctx.options.usage_redis.strip()
        key = (url, ctx.options.usage_db)
        if key == self._key:
            return
        self._key = key
        self._close()
        if not url:
            return
        try:
            ping(url).close()
        except (ValueError, ConnectionError) as exc:
            raise exceptions.OptionsError(f"usage_redis: {exc}") from None
        self.publisher = Publisher(ctx.options.usage_db, url)

    def done(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
