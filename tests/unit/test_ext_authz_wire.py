"""The vendored ext_authz protos (pipeline/gateway/ext_authz/) speak Envoy's wire format.

The golden bytes were made once with Envoy's real classes, as xds-protos 1.85.0 generates them
(`envoy.service.auth.v3.external_auth_pb2` and friends), serialised with `SerializeToString(deterministic=True)`;
xds-protos is not imported here, because importing it can break opentelemetry-proto's modules. The same run
parsed our messages with Envoy's classes and back, and found every `envoy.type.v3.StatusCode` round-trips.
"""

import asyncio

import grpc
from google.rpc import code_pb2, status_pb2

from pipeline.gateway.ext_authz import authorization_handler
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz

BODY = '{"model": "gpt-4o", "messages": []}'

#: Envoy's CheckRequest with what the filter sends besides what we read: the peer's address, the request's time,
#: id, scheme, protocol and size, and a context extension
ENVOY_REQUEST = bytes.fromhex(
    "0af3010a120a100a0e120831302e302e302e3718a2900322d4010a0608c0d1b6c90612c9010a04343731311204504f53541a1c0a0d"
    "617574686f72697a6174696f6e120b42656172657220736b2d311a1c0a12782d7370656e6473747265616d2d7465616d1206736561"
    "72636822142f76312f636861742f636f6d706c6574696f6e732a0c6c6c6d2e696e7465726e616c3205687474707348235208485454"
    "502f312e315a237b226d6f64656c223a20226770742d346f222c20226d65737361676573223a205b5d7d62237b226d6f64656c223a"
    "20226770742d346f222c20226d65737361676573223a205b5d7d52060a016b120176")
#: Envoy's CheckResponse for `ok()` below
ENVOY_OK = bytes.fromhex(
    "0a001a810112270a230a16782d7370656e6473747265616d2d6465636973696f6e1209646f776e6772616465180212260a220a1378"
    "2d7370656e6473747265616d2d6d6f64656c120b6770742d346f2d6d696e6918022a11782d7370656e6473747265616d2d6b657932"
    "1b0a170a12782d7370656e6473747265616d2d6e6f746512016e1802")
#: Envoy's CheckResponse for `denied()` below
ENVOY_DENIED = bytes.fromhex(
    "0a02080812400a0308ad0312150a110a0b72657472792d6166746572120236301802120c0a0a0a05782d7261771a01ff1a147b2265"
    "72726f72223a2022626c6f636b6564227d")


def overwrite(key: str, value: str) -> ext_authz.HeaderValueOption:
    return ext_authz.HeaderValueOption(header=ext_authz.HeaderValue(key=key, value=value),
                                       append_action=ext_authz.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def ok() -> ext_authz.CheckResponse:
    return ext_authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ext_authz.OkHttpResponse(
        headers=[overwrite("x-spendstream-decision", "downgrade"), overwrite("x-spendstream-model", "gpt-4o-mini")],
        headers_to_remove=["x-spendstream-key"], response_headers_to_add=[overwrite("x-spendstream-note", "n")]))


def denied() -> ext_authz.CheckResponse:
    raw = ext_authz.HeaderValueOption(header=ext_authz.HeaderValue(key="x-raw", raw_value=b"\xff"))
    return ext_authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED),
        denied_response=ext_authz.DeniedHttpResponse(status=ext_authz.HttpStatus(code=429),
                                                     headers=[overwrite("retry-after", "60"), raw],
                                                     body='{"error": "blocked"}'))


def test_we_read_what_envoy_sends() -> None:
    http = ext_authz.CheckRequest.FromString(ENVOY_REQUEST).attributes.request.http
    assert (http.method, http.path, http.host) == ("POST", "/v1/chat/completions", "llm.internal")
    assert dict(http.headers) == {"authorization": "Bearer sk-1", "x-spendstream-team": "search"}
    assert (http.body, http.raw_body) == (BODY, BODY.encode())


def test_our_answers_are_envoys_bytes() -> None:
    for ours, envoys in ((ok(), ENVOY_OK), (denied(), ENVOY_DENIED)):
        assert ours.SerializeToString(deterministic=True) == envoys
        assert ext_authz.CheckResponse.FromString(envoys) == ours


def test_any_http_status_goes_over_as_its_number() -> None:
    """Envoy's StatusCode has more values than we copied; proto3 enums are open, so they still travel."""
    assert ext_authz.HttpStatus.FromString(ext_authz.HttpStatus(code=503).SerializeToString()).code == 503


def test_check_answers_on_envoys_method_path() -> None:
    """Envoy calls `/envoy.service.auth.v3.Authorization/Check` whatever our proto package is."""
    async def check(request: ext_authz.CheckRequest, _: object) -> ext_authz.CheckResponse:
        assert request.attributes.request.http.path == "/v1/chat/completions"
        return denied()

    async def call() -> bytes:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((authorization_handler(check),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer: bytes = await channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(
                    ENVOY_REQUEST, timeout=10)
                return answer
        finally:
            await server.stop(grace=None)

    assert asyncio.run(call()) == denied().SerializeToString()
