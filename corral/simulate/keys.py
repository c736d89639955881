"""Typed application keys, in their own module so route modules avoid import cycles."""

from __future__ import annotations

from aiohttp import web

from corral.simulate.engine import SimEngine

ENGINE = web.AppKey("engine", SimEngine)
