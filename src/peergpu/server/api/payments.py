"""Placeholder: filled in by the billing work."""

from __future__ import annotations

from fastapi import APIRouter

from peergpu.server.api.responses import AUTHENTICATED

router = APIRouter(tags=["payments"], responses=AUTHENTICATED)
