"""Where Litestar 2 answers or documents otherwise than msgspec and the API
document say: the app's ``before_request`` hook and a schema plugin mend it.
Each workaround says when it can go."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.enums import HttpMethod, MediaType
from litestar.exceptions import ValidationException
from litestar.openapi.spec import Schema
from litestar.routes import HTTPRoute
from litestar.status_codes import HTTP_204_NO_CONTENT

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition


# Litestar copies a field's bounds into the document only when they are truthy.
_BOUNDS = {"ge": "minimum", "gt": "exclusive_minimum", "le": "maximum", "lt": "exclusive_maximum"}


# Can go once Litestar's Struct plugin writes additionalProperties and zero bounds itself.
class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's schemas of msgspec Structs, made to say what msgspec enforces:
    ``additionalProperties: false`` for a Struct that forbids unknown fields (the
    request bodies), and the bounds of 0 Litestar leaves out (``gt=0``).

    Listed in the app's plugins, it comes before Litestar's own Struct plugin,
    which it extends.
    """

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        struct: type[msgspec.Struct] = field_definition.type_
        if struct.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            prop = (schema.properties or {}).get(field.encode_name)
            bounded = _bounded(field.type)
            if not isinstance(prop, Schema) or bounded is None:
                continue
            for bound, keyword in _BOUNDS.items():
                if getattr(bounded, bound, None) == 0 and getattr(prop, keyword) is None:
                    setattr(prop, keyword, 0)
        return schema


def _bounded(kind: msgspec.inspect.Type) -> msgspec.inspect.Type | None:
    """The number type of a field, or of its non-null arm when it is optional."""
    if isinstance(kind, msgspec.inspect.UnionType):
        arms = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(arms) != 1:
            return None
        kind = arms[0]
    if isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    return kind if isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType) else None


async def before_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    """The app's ``before_request`` hook: OPTIONS answered whole, bodies read strictly."""
    if request.method == HttpMethod.OPTIONS:
        return _options(request)
    await _check_body(request)
    return None


# Can go with Litestar 3 (litestar-org/litestar#4169 fixed there).
def _options(request: Request[Any, Any, Any]) -> Response[None]:
    """OPTIONS with every method of the path in ``Allow``: Litestar 2's own
    handler lists only those of the first handler registered on a path
    (litestar-org/litestar#4169, fixed in Litestar 3)."""
    template = request.scope["path_template"]
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, HTTPRoute) and route.path_format == template
        for method in route.methods
    }
    return Response(
        None,
        status_code=HTTP_204_NO_CONTENT,
        headers={"Allow": ", ".join(sorted({*methods, HttpMethod.OPTIONS}))},
        media_type=MediaType.TEXT,
    )


# Can go if Litestar decodes JSON bodies strictly (2.x converts them as query strings).
async def _check_body(request: Request[Any, Any, Any]) -> None:
    """A JSON body read as the document types it. Litestar converts a handler's
    ``data`` leniently (``"stream": 0`` for false, ``"nodes": "2"`` for 2), as it
    must query strings; the prompt route's fast path reads strictly already.
    JSON's ``2.0`` is the integer 2 all the same (JSON Schema says so). Malformed
    JSON is left to Litestar's own answer."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    if data is None or not data.is_subclass_of(msgspec.Struct):
        return
    try:
        value = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return
    try:
        msgspec.convert(_whole_numbers(value), data.annotation, strict=True)
    except RecursionError:
        raise ValidationException(
            detail="Malformed request: JSON nested too deeply",
            extra=[{"message": "malformed: JSON nested too deeply", "key": "", "source": "body"}],
        ) from None
    except msgspec.ValidationError as exc:
        raise ValidationException(
            detail=f"Validation failed for {request.method} {request.url.path}",
            extra=[{"message": str(exc), "key": "", "source": "body"}],
        ) from None


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value
