//! gRPC through the proxy with a tonic client: unary and server-streaming calls,
//! trailers (`grpc-status`) intact, and error statuses passed through.

use lacewing_tests::grpc::{EchoClient, NOT_FOUND_MESSAGE};
use lacewing_tests::{proxy, servers};
use tonic::Code;

async fn client_through_proxy() -> (EchoClient, lacewing_proxy::ProxyHandle, servers::TestServer) {
    let upstream = servers::grpc_echo_named("grpc-a").await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "h2"));
    let client = EchoClient::connect(proxy::listener_addr(&handle, "main"))
        .await
        .expect("connect to the proxy over h2c");
    (client, handle, upstream)
}

#[tokio::test]
async fn grpc_unary_call_through_the_proxy() {
    let (mut client, _handle, _upstream) = client_through_proxy().await;

    let response = client
        .echo("hello over grpc")
        .await
        .expect("unary call succeeds");

    assert_eq!(response.get_ref().message, "hello over grpc");
    assert_eq!(
        response
            .metadata()
            .get("x-upstream")
            .map(|v| v.to_str().unwrap()),
        Some("grpc-a")
    );
}

#[tokio::test]
async fn grpc_server_streaming_delivers_every_message_and_trailers() {
    let (mut client, _handle, _upstream) = client_through_proxy().await;

    let mut stream = client
        .repeat("tick", 50)
        .await
        .expect("streaming call starts")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream ends with OK") {
        assert_eq!(reply.message, "tick");
        indexes.push(reply.index);
    }

    assert_eq!(indexes, (0..50).collect::<Vec<_>>());
    let trailers = stream
        .trailers()
        .await
        .expect("trailers are readable")
        .expect("the stream ends with trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );
}

#[tokio::test]
async fn grpc_error_status_passes_through() {
    let (mut client, _handle, _upstream) = client_through_proxy().await;

    let status = client
        .echo(NOT_FOUND_MESSAGE)
        .await
        .expect_err("the upstream answers NOT_FOUND");

    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains(NOT_FOUND_MESSAGE),
        "the upstream's message survives: {status:?}"
    );
    // The connection is still usable after an error status.
    let ok = client
        .echo("after the error")
        .await
        .expect("next call succeeds");
    assert_eq!(ok.get_ref().message, "after the error");
}
