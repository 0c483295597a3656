"""The preset filters and banks a pipeline can name."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ApiKeyDep
from service.api.docs import problem_responses
from service.filters import BANKS, PRESETS
from service.schemas import FilterBank, FilterPreset, FiltersResponse

router = APIRouter(prefix="/v1", tags=["filters"], dependencies=[ApiKeyDep], responses=problem_responses(401))


@router.get("/filters", response_model=FiltersResponse)
def list_filters() -> FiltersResponse:
    """List the preset filters (kernel and description) and the banks that group them."""
    return FiltersResponse(
        filters=[
            FilterPreset(name=p.name, kernel=p.kernel.tolist(), description=p.description) for p in PRESETS.values()
        ],
        banks=[FilterBank(name=b.name, filters=list(b.filters), description=b.description) for b in BANKS.values()],
    )
