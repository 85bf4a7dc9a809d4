"""GET /v1/models and /v1/models/{model_id}: the models this key may use, in OpenAI's shape (so
the OpenAI SDK's `client.models.list()` works), with imagegate's capabilities under `imagegate`."""

from __future__ import annotations

from flask import Blueprint

from imagegate.app.model_catalog import model_view, providers_file_time
from imagegate.app.read_schemas import ModelList, ModelView
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError
from imagegate.app.web.intake import usable_models
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.services import services

bp = Blueprint("models", __name__, url_prefix="/v1/models")
bp.before_request(require_api_key)


def _views() -> dict[str, ModelView]:
    svc = services()
    created = providers_file_time(svc.settings.providers_file)
    usable = usable_models(svc)
    default = next(iter(usable), None)
    return {name: model_view(config, created=created, default=name == default) for name, config in usable.items()}


@bp.get("")
@bp.get("/")
@operation(
    operation_id="listModels",
    summary="The models this key may use, in the providers file's order",
    replies={200: Reply("OpenAI's list of model objects", ModelList)},
    errors=(401,),
)
def list_models():
    return ModelList(data=list(_views().values())).model_dump(mode="json")


# A model's name may hold slashes (vendor/model), as OpenAI-compatible gateways' names often do.
@bp.get("/<path:model_id>")
@operation(
    operation_id="retrieveModel",
    summary="One model this key may use (404 for any other)",
    replies={200: Reply("The model object", ModelView)},
    errors=(401, 404),
)
def retrieve_model(model_id: str):
    found = _views().get(model_id)
    if found is None:
        raise ApiError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return found.model_dump(mode="json")
