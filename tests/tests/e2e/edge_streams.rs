//! Per-stream bounds, as a client and an upstream see them: an exchange that
//! makes no progress either way for `stream_idle_timeout` gets 408 before its
//! response head (flag `SI`) and is cut after it, its upstream released; an
//! HTTP/2 header block (HEADERS, CONTINUATION) left open on a connection
//! that already made requests is cut after `header_read_timeout`; one HTTP/2
//! stream whose window the client keeps closed is reset after
//! `write_timeout` (flag `SI`, upstream released) while the connection's
//! other streams go on.
//!
//! Timers are set to a few hundred milliseconds so the tests are quick; the
//! waits below only bound a regression, they assert nothing about speed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use lacewing_tests::access_log::LogFile;
use lacewing_tests::{client, eventually, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::edge_timers::{
    HANG_GUARD, Upstream, closed_by_peer, flagged, get_cut, get_on_stream, h2_connect,
    stream_frame, write_until_broken,
};

/// One listener `main` whose streams idle out after `{idle}`, to cluster `up`,
/// access log to `{log}`. The other timers are long, so only this one fires.
const CONFIG: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
access_log: { path: '{log}' }
listeners:
  - name: main
    address: 127.0.0.1:0
    limits:
      stream_idle_timeout: {idle}
      upstream_body_timeout: 60s
      write_timeout: {write}
{more}    routes: [{ name: all, cluster: up }]
clusters:
  - { name: up, endpoints: ['{up}'] }
";

fn start_with(log: &LogFile, up: &Upstream, more: &str) -> lacewing_proxy::ProxyHandle {
    start_timed(log, up, "300ms", "60s", more)
}

/// [`CONFIG`] with `stream_idle_timeout: idle` and `write_timeout: write`.
fn start_timed(
    log: &LogFile,
    up: &Upstream,
    idle: &str,
    write: &str,
    more: &str,
) -> lacewing_proxy::ProxyHandle {
    proxy::start(&proxy::fill(
        CONFIG,
        &[
            ("log", &log.path().display()),
            ("up", &up.addr),
            ("idle", &idle),
            ("write", &write),
            ("more", &more),
        ],
    ))
}

/// An upstream that reads whatever comes and never answers.
async fn silent() -> Upstream {
    Upstream::start(|mut stream| async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// A request body that sends one chunk and then never another, nor its end.
struct Stalled {
    sent: bool,
}

impl Body for Stalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.sent, true) {
            Poll::Pending
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"0123456789")))))
        }
    }
}

#[tokio::test]
async fn a_stream_idle_before_its_response_head_gets_408_and_its_upstream_released() {
    let log = LogFile::new("edge-streams-idle-head");
    let up = silent().await;
    let handle = start_with(&log, &up, "");

    // HTTP/1.1: 10 of 100 promised body bytes, then nothing; the upstream
    // waits for the rest and never answers.
    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    stream
        .write_all(b"POST /h1 HTTP/1.1\r\nHost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let head = tokio::time::timeout(HANG_GUARD, client::read_head(&mut stream))
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let line = flagged(&log, "SI").await;
    assert_eq!(line["status"], 408);
    assert_eq!(line["path"], "/h1");
    up.all_released().await;

    // h2: the same with a request body that stalls after its first chunk.
    let request = Request::post(proxy::url(&handle, "main", "/h2"))
        .body(Stalled { sent: false })
        .unwrap();
    let response = client::send_streaming_h2(request).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("stream idle"),
        "{body:?}"
    );
    let h2_line = log
        .find("the h2 exchange's line", |l| {
            l["path"] == "/h2" && l["flag"] == "SI"
        })
        .await;
    assert_eq!(h2_line["status"], 408);
    up.all_released().await;
}

#[tokio::test]
async fn a_stream_idle_after_its_response_head_is_cut_and_its_upstream_released() {
    let log = LogFile::new("edge-streams-idle-body");
    // A head promising 1 MB, 10 bytes of it, then nothing: the 60 s
    // `upstream_body_timeout` would not fire, the stream idle timer does.
    let up = Upstream::stalling().await;
    let handle = start_with(&log, &up, "");
    let url = proxy::url(&handle, "main", "/stall");
    for (h2, lines) in [(false, 1), (true, 2)] {
        get_cut(&url, h2).await;
        eventually(&format!("{lines} lines flagged SI"), || async {
            log.lines().iter().filter(|l| l["flag"] == "SI").count() == lines
        })
        .await;
        let statuses: Vec<_> = log.lines().iter().map(|l| l["status"].clone()).collect();
        assert!(statuses.iter().all(|s| s == 200), "{statuses:?}");
        up.all_released().await;
    }
}

/// Sends a frame header announcing 16,000 payload bytes (within the
/// default largest frame), then trickles the payload one byte every 20 ms
/// until the connection breaks: the frame would take over five minutes.
fn trickle_payload(
    write: tokio::net::tcp::OwnedWriteHalf,
    kind: u8,
    flags: u8,
) -> tokio::task::JoinHandle<()> {
    let mut head = stream_frame(kind, flags, 3, &[]);
    head[..3].copy_from_slice(&16_000u32.to_be_bytes()[1..]);
    write_until_broken(write, head, b"p".to_vec(), Duration::from_millis(20))
}

#[tokio::test]
async fn an_h2_header_block_left_open_after_the_first_request_is_cut() {
    let log = LogFile::new("edge-streams-h2-headers");
    let up = Upstream::large(10).await;
    // Stream idleness is off: only the header-block timer can fire.
    let handle = start_timed(&log, &up, "0s", "60s", "      header_read_timeout: 300ms\n");
    for (n, what) in [
        (1, "a HEADERS frame whose payload trickles"),
        (
            2,
            "HEADERS without END_HEADERS, then CONTINUATION frames that trickle",
        ),
    ] {
        let (mut read, mut write) = h2_connect(&handle).await.into_split();
        // A first request, answered: the first-head timer is done with.
        write.write_all(&get_on_stream(1)).await.unwrap();
        eventually("the first request is answered", || async {
            log.lines().iter().filter(|l| l["status"] == 200).count() == n
        })
        .await;
        let trickler = if n == 1 {
            // HEADERS, END_STREAM | END_HEADERS, its payload trickled.
            trickle_payload(write, 0x1, 0x5)
        } else {
            // HEADERS without END_HEADERS, two CONTINUATION frames without it
            // either (fewer than h2's own flood limit), then one trickled.
            write
                .write_all(&stream_frame(0x1, 0x1, 3, &[0x82, 0x86]))
                .await
                .unwrap();
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                write
                    .write_all(&stream_frame(0x9, 0, 3, &[0x84]))
                    .await
                    .unwrap();
            }
            trickle_payload(write, 0x9, 0x4)
        };
        let closed = closed_by_peer(&mut read).await;
        trickler.abort();
        assert!(closed, "{what}: the proxy closes the connection");
    }
}

/// Reads frames until `found` has seen what it looks for (it returns true).
async fn read_frames(stream: &mut TcpStream, mut found: impl FnMut(u8, u8, u32, &[u8]) -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.expect("a frame header");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            stream
                .read_exact(&mut payload)
                .await
                .expect("a frame payload");
            if found(head[3], head[4], id, &payload) {
                return;
            }
        }
    })
    .await
    .expect("the frames come");
}

#[tokio::test]
async fn an_h2_client_may_send_no_more_ahead_than_the_connection_buffer() {
    let log = LogFile::new("edge-streams-buffer");
    let up = Upstream::large(10).await;
    let handle = start_with(&log, &up, "      max_connection_buffer: 256KiB\n");
    let mut stream = h2_connect(&handle).await;
    // The proxy's SETTINGS (INITIAL_WINDOW_SIZE, per stream) and the
    // WINDOW_UPDATE that sets the connection's window past the initial 65,535.
    let (mut stream_window, mut connection_window) = (None, None);
    read_frames(&mut stream, |kind, flags, id, payload| {
        match (kind, id) {
            (0x4, 0) if flags & 0x1 == 0 => {
                stream_window = payload
                    .chunks(6)
                    .find(|s| s[..2] == [0, 4])
                    .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
            }
            (0x8, 0) => {
                let increment =
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                connection_window = Some(65_535 + increment);
            }
            _ => {}
        }
        stream_window.is_some() && connection_window.is_some()
    })
    .await;
    assert_eq!(
        stream_window,
        Some(256 * 1024),
        "SETTINGS_INITIAL_WINDOW_SIZE"
    );
    assert_eq!(
        connection_window,
        Some(256 * 1024),
        "the connection's window"
    );
}

/// Answers `/big` with 8 MiB and any other path with `ok` (HTTP/1.1,
/// keep-alive).
async fn big_and_small() -> Upstream {
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    Upstream::start(move |stream| {
        let big = big.clone();
        async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/big" {
                    big.clone()
                } else {
                    Bytes::from_static(b"ok")
                };
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(body),
                    ))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// Sends a GET for `path` on `client` and reads its whole body, giving the
/// window back as it comes; returns the status and the body.
async fn h2_get(client: &mut h2::client::SendRequest<Bytes>, url: &str) -> (StatusCode, Bytes) {
    let request = Request::get(url).body(()).unwrap();
    let (response, _) = client.send_request(request, true).expect("a stream");
    let response = response.await.expect("a response");
    let status = response.status();
    let mut body = response.into_body();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("a whole body");
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    (status, Bytes::from(all))
}

#[tokio::test]
async fn one_h2_stream_stalled_by_its_window_is_reset_while_the_others_go_on() {
    let log = LogFile::new("edge-streams-stalled-stream");
    let up = big_and_small().await;
    // Only the write timer is short: the stream idle timer is off.
    let handle = start_timed(&log, &up, "0s", "300ms", "");
    let tcp = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    // The connection's window is wide open; each stream's is the default
    // 65,535 bytes, given back only for the bytes the client reads.
    let (client, connection) = h2::client::Builder::new()
        .initial_connection_window_size(64 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();

    // Stream A asks for 8 MiB and never reads: its window closes.
    let request = Request::get(proxy::url(&handle, "main", "/big"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).expect("stream A");
    let response = tokio::time::timeout(HANG_GUARD, response)
        .await
        .expect("A's head comes")
        .expect("A's response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stalled = response.into_body();

    // Stream B's requests on the same connection keep succeeding until A's
    // line is written.
    let small = proxy::url(&handle, "main", "/small");
    let mut served = 0;
    tokio::time::timeout(HANG_GUARD, async {
        while !log.lines().iter().any(|l| l["flag"] == "SI") {
            let (status, body) = h2_get(&mut client, &small).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("A is cut");
    assert!(served > 0);
    let line = flagged(&log, "SI").await;
    assert_eq!(line["path"], "/big");
    assert_eq!(line["status"], 200);
    // A's upstream connection is released; B's stays pooled.
    eventually("A's upstream connection is closed", || async {
        up.closed() == 1
    })
    .await;

    // The connection still serves.
    let (status, body) = h2_get(&mut client, &small).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    eventually("a clean line for each of B's requests", || async {
        let clean = log
            .lines()
            .into_iter()
            .filter(|l| l["path"] == "/small" && l["status"] == 200 && l["flag"] == "-");
        clean.count() == served + 1
    })
    .await;

    // What A's client finds: the bytes its window let through, then a reset.
    let mut received = 0;
    let ended = tokio::time::timeout(HANG_GUARD, async {
        while let Some(chunk) = stalled.data().await {
            match chunk {
                Ok(chunk) => received += chunk.len(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .expect("A ends");
    let err = ended.expect_err("A is reset, not complete");
    assert!(err.is_reset(), "{err}");
    assert!(received < 8 << 20, "{received} bytes");
}
