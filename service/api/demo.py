"""GET /: the demo page (plain HTML/CSS/JS from service/static, no build step, works offline)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
